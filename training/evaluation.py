"""Periodic evaluation: validation loss, and next-item HR@K / NDCG@K over all items for interaction data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data.builders import example_to_sequence
from data.formats import UserSequence
from data.pipeline import PipelineConfig, make_dataset, sequence_to_page_log
from data.vocab import EOS, Vocabulary
from model.sharding import use_mesh


def validation_loss(trainer, params, source, vocab: Vocabulary, kind: str, pipeline_cfg: PipelineConfig,
                    num_batches: int, shard_index: int, shard_count: int) -> float:
    """Mean cross-entropy per target token over `num_batches` fixed validation batches."""
    cfg = PipelineConfig(seq_len=pipeline_cfg.seq_len, batch_size=pipeline_cfg.batch_size, pack=False,
                         shuffle_seed=1234, stream_weight=0.0)
    iterator = iter(make_dataset(source, vocab, kind, cfg, shard_index, shard_count))
    loss_sum = count = 0.0
    for _ in range(num_batches):
        out = trainer.eval_step(params, trainer.global_batch(next(iterator)))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
    return loss_sum / max(count, 1.0)


def ranking_metrics(ranks: np.ndarray, ks=(5, 10, 20, 50)) -> dict[str, float]:
    """HR@K (= Recall@K with one target), NDCG@K and MRR from 0-based ranks of the targets."""
    ranks = np.asarray(ranks, np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out


class NextItemRanker:
    """Scores every item at the last position of `BOS SEP SEP PAGE SHELF(next) history...` and returns
    the rank of each target (0 = best; ties count against the target)."""

    def __init__(self, trainer, vocab: Vocabulary, seq_len: int, batch_size: int):
        self.trainer, self.vocab, self.seq_len, self.batch_size = trainer, vocab, seq_len, batch_size
        first, count = vocab.item_offset, vocab.items.num_tokens
        graphdef = trainer.graphdef

        def ranks(params, tokens, lengths, targets, seen):
            model = nnx.merge(graphdef, params)
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            segments = (positions < lengths[:, None]).astype(jnp.int32)
            hidden, _ = model.hidden(tokens, positions, segments)
            last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
            scores = model.logits(last, jnp.arange(first, first + count))
            scores = jnp.where(seen, -jnp.inf, scores)
            target_score = jnp.take_along_axis(scores, targets[:, None], axis=1)
            return jnp.sum(scores >= target_score, axis=1) - 1

        self._ranks = jax.jit(ranks, out_shardings=trainer.replicated)

    def encode(self, user: UserSequence) -> tuple[list[int], int]:
        history = UserSequence(user.user_id, user.items[:-1])
        tokens = self.vocab.encode(sequence_to_page_log(history, self.seq_len - 5)).tokens.tolist()
        assert tokens[-1] == EOS
        target = self.vocab.items.encode(user.items[-1])
        return tokens[:-1], -1 if target is None else target[0]

    def rank(self, params, users: list[UserSequence], filter_seen: bool = False) -> np.ndarray:
        """0-based ranks of each user's last item given the rest; `filter_seen` removes history items
        (other than the target) from the ranking."""
        out = []
        n_items = self.vocab.items.num_tokens
        for start in range(0, len(users), self.batch_size):
            chunk = users[start:start + self.batch_size]
            tokens = np.zeros((self.batch_size, self.seq_len), np.int32)
            lengths = np.ones(self.batch_size, np.int32)
            targets = np.zeros(self.batch_size, np.int32)
            seen = np.zeros((self.batch_size, n_items), bool)
            for row, user in enumerate(chunk):
                seq, targets[row] = self.encode(user)
                tokens[row, :len(seq)], lengths[row] = seq, len(seq)
                if filter_seen:
                    codes = [self.vocab.items.encode(i) for i in user.items[:-1]]
                    seen[row, [c[0] for c in codes if c is not None]] = True
                    seen[row, targets[row]] = False
            arrays = [self._global(a) for a in (tokens, lengths, targets, seen)]
            with use_mesh(self.trainer.mesh, self.trainer.rules):
                ranks = np.asarray(self._ranks(params, *arrays))
            out.append(ranks[:len(chunk)])
        return np.concatenate(out) if out else np.zeros(0)

    def _global(self, array: np.ndarray) -> jax.Array:
        """The same host array on every process, laid out along the batch axis of the mesh."""
        spec = jax.sharding.PartitionSpec(self.trainer.batch_sharding.spec[0])
        sharding = jax.sharding.NamedSharding(self.trainer.mesh, spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def validation_users(source, max_users: int) -> list[UserSequence]:
    """The first `max_users` users of a validation/test split (deterministic order)."""
    n = len(source) if not max_users else min(max_users, len(source))
    return [example_to_sequence(source[k]) for k in range(n)]
