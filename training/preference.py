"""Preference pairs for the DPO stage: a folder of (chosen page, rejected page) pairs of one prompt, with the
reference model's log-probability of each page, and the grain pipeline and validation that read them.

A pair folder holds `pairs.npz` (arrays below) and `pairs.json` (how the pairs were made: the checkpoint,
its step, the reward models, the data folder of the checkpoint's run). Row k of every array is one pair;
axis 1 is (chosen, rejected):

- `tokens` (N, 2, L) int32: prompt + page tokens, right-padded with PAD;
- `lengths` (N, 2) int32: real tokens of each row;
- `page_mask` (N, 2, L) float32: 1 where the token belongs to the page (its log-probability counts);
- `values` (N, 2, L) float32: the reward model's stream probability of an item at its (last) token, -1
  elsewhere (the value head is held to them, so that optimising the policy does not move it);
- `ref_log_probs` (N, 2) float32: the reference (starting) model's log-probability of each page.
"""

from __future__ import annotations

import dataclasses
import json
import os

import grain
import jax
import numpy as np

from homegen.data.pipeline import ProcessRows

PAIRS_FILE, META_FILE = "pairs.npz", "pairs.json"
ARRAYS = {"tokens": np.int32, "lengths": np.int32, "page_mask": np.float32, "values": np.float32,
          "ref_log_probs": np.float32}


@dataclasses.dataclass
class PreferencePairs:
    """Pairs as arrays (see the module docstring) plus how they were made (`meta`)."""

    tokens: np.ndarray
    lengths: np.ndarray
    page_mask: np.ndarray
    values: np.ndarray
    ref_log_probs: np.ndarray
    meta: dict

    def __post_init__(self):
        n = len(self.tokens)
        if self.tokens.ndim != 3 or self.tokens.shape[1] != 2:
            raise ValueError(f"pair tokens must be (pairs, 2, length), got {self.tokens.shape}")
        for name in ("page_mask", "values"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(f"pair {name} has shape {getattr(self, name).shape}, tokens {self.tokens.shape}")
        for name in ("lengths", "ref_log_probs"):
            if getattr(self, name).shape != (n, 2):
                raise ValueError(f"pair {name} has shape {getattr(self, name).shape}, expected {(n, 2)}")
        if not np.isfinite(self.ref_log_probs).all():
            raise ValueError("pair reference log-probabilities must be finite")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return {name: getattr(self, name)[k] for name in ARRAYS}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every pair as one batch."""
        return {name: getattr(self, name) for name in ARRAYS}

    def take(self, rows: np.ndarray) -> PreferencePairs:
        return PreferencePairs(**{name: getattr(self, name)[rows] for name in ARRAYS}, meta=self.meta)

    def split(self, validation_fraction: float, seed: int = 0) -> tuple[PreferencePairs, PreferencePairs]:
        """(training pairs, validation pairs): a fixed random `validation_fraction` held out (at least one
        pair when there are two or more)."""
        order = np.random.default_rng(seed).permutation(len(self))
        held = min(max(int(round(validation_fraction * len(self))), 1 if len(self) > 1 else 0), len(self) - 1)
        return self.take(np.sort(order[held:])), self.take(np.sort(order[:held]))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        np.savez_compressed(os.path.join(folder, PAIRS_FILE), **self.arrays())
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(self.meta, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> PreferencePairs:
        """The pairs of a folder written by `save` (scripts/preference_pairs.py); ValueError naming what is
        missing or wrong."""
        path = os.path.join(folder, PAIRS_FILE)
        if not os.path.exists(path):
            raise ValueError(f"{path} does not exist: make preference pairs with scripts/preference_pairs.py")
        try:
            with np.load(path) as data:
                arrays = {name: data[name].astype(dtype) for name, dtype in ARRAYS.items()}
            with open(os.path.join(folder, META_FILE)) as f:
                meta = json.load(f)
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{folder} does not hold readable preference pairs: {e}") from None
        return cls(**arrays, meta=meta)


def pair_dataset(pairs: PreferencePairs, batch_size: int, seed: int, shard_index: int = 0,
                 shard_count: int = 1) -> grain.IterDataset:
    """Shuffled, endlessly repeated batches of this process's `batch_size` pairs (the global batch is the
    same for any number of processes); its iterator's state is saved with each checkpoint."""
    ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat(None)
    if shard_count > 1:
        ds = ProcessRows(ds, batch_size, shard_index, shard_count)
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


def preference_validation(trainer, params, pairs: PreferencePairs, batch_size: int) -> dict[str, float]:
    """DPO loss, accuracy (share of pairs whose chosen page gains more log-probability over the reference
    than the rejected one) and mean implicit reward margin over every whole batch of the validation pairs
    (each process evaluates its own rows)."""
    shard, count = jax.process_index(), jax.process_count()
    local = batch_size // count
    sums: dict[str, float] = {}
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        rows = np.arange(start + shard * local, start + (shard + 1) * local)
        out = trainer.eval_step(params, trainer.global_batch(pairs.take(rows).arrays()))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    if not sums:
        return {}
    n = max(sums["count"], 1.0)
    return {"validation_preference_loss": sums["loss_sum"] / n,
            "validation_preference_accuracy": sums["accuracy_sum"] / n,
            "validation_reward_margin": sums["margin_sum"] / n}
