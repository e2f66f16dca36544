"""Evaluation while training: validation loss, and next-item HR@K / NDCG@K over all items for interaction data."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.data.builders import example_to_sequence
from homegen.data.formats import UserSequence
from homegen.data.pipeline import PipelineConfig, make_dataset, sequence_capacity, sequence_to_page_log
from homegen.data.semantic_ids import item_trie
from homegen.data.vocab import EOS, Vocabulary
from homegen.model.decoding import item_beam_search, pad_prompts
from homegen.model.sharding import use_mesh


def validation_loss(trainer, params, source, vocab: Vocabulary, kind: str, pipeline_cfg: PipelineConfig,
                    num_batches: int, shard_index: int, shard_count: int) -> dict[str, float]:
    """Mean cross-entropy per target token over `num_batches` fixed validation batches (`validation_loss`)
    and, for a model with a value head, its mean cross-entropy per logged item (`validation_value_loss`)."""
    cfg = dataclasses.replace(pipeline_cfg, pack=False, shuffle_seed=1234, stream_weight=0.0, skip_weight=1.0,
                              workers=0)
    iterator = iter(make_dataset(source, vocab, kind, cfg, shard_index, shard_count))
    sums: dict[str, float] = {}
    for _ in range(num_batches):
        out = trainer.eval_step(params, trainer.global_batch(next(iterator)))
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    result = {"validation_loss": sums["loss_sum"] / max(sums["count"], 1.0)}
    if "value_sum" in sums:
        result["validation_value_loss"] = sums["value_sum"] / max(sums["value_count"], 1.0)
    return result


def ranking_metrics(ranks: np.ndarray, ks=(5, 10, 20, 50)) -> dict[str, float]:
    """HR@K (= Recall@K with one target), NDCG@K and MRR from 0-based ranks of the targets (infinity for
    a target that was not ranked at all)."""
    ranks = np.asarray(ranks, np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out


RANKING_METHODS = ("score", "beam")


class NextItemRanker:
    """Ranks each user's last item given the rest of the sequence, from the model's prediction after
    `BOS SEP SEP PAGE SHELF(next) history...`, in one of two ways:

    - `score`: every item's logit at the last position, the target's 0-based rank among all items (ties
      count against it). Only for atomic item tokens (one token per item).
    - `beam`: beam search of `beam_size` items along the trie of item code tuples, the path semantic IDs
      take (TIGER); the target's rank is its place in the beam, infinity when the beam missed it.
    """

    def __init__(self, trainer, vocab: Vocabulary, seq_len: int, batch_size: int, method: str = "score",
                 beam_size: int = 50):
        if method not in RANKING_METHODS:
            raise ValueError(f"ranking method must be one of {RANKING_METHODS}, got {method!r}")
        if method == "score" and vocab.items.tokens_per_item != 1:
            raise ValueError("ranking by scoring all items needs atomic item tokens; use method='beam'")
        self.trainer, self.vocab, self.seq_len, self.batch_size = trainer, vocab, seq_len, batch_size
        self.method, self.beam_size = method, beam_size
        self.history_items = sequence_capacity(vocab, seq_len) - 1
        graphdef = trainer.graphdef
        items = vocab.items
        if method == "beam":
            children = jnp.asarray(item_trie(items.code_table()))
            starts = tuple(vocab.item_offset + o for o in items.level_offsets)

            def ranks(params, tokens, lengths, targets, seen):
                found, _ = item_beam_search(graphdef, params, tokens, lengths, children, seen, level_starts=starts,
                                            level_sizes=tuple(items.level_sizes), beam_size=beam_size)
                hit = found == targets[:, None]
                return jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1).astype(jnp.float32), jnp.inf)
        else:
            first, count = vocab.item_offset, items.num_tokens

            def ranks(params, tokens, lengths, targets, seen):
                model = nnx.merge(graphdef, params)
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                segments = (positions < lengths[:, None]).astype(jnp.int32)
                hidden, _ = model.hidden(tokens, positions, segments)
                last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
                scores = model.logits(last, jnp.arange(first, first + count))
                scores = jnp.where(seen, -jnp.inf, scores)
                target_score = jnp.take_along_axis(scores, targets[:, None], axis=1)
                rank = (jnp.sum(scores >= target_score, axis=1) - 1).astype(jnp.float32)
                return jnp.where(jnp.take_along_axis(seen, targets[:, None], axis=1)[:, 0], jnp.inf, rank)

        self._ranks = jax.jit(ranks, out_shardings=trainer.replicated)

    def encode(self, user: UserSequence) -> tuple[list[int], int]:
        """The prompt (the user's items but the last, newest `history_items` of them) and the index of
        the last item (-1 when it is not in the vocabulary)."""
        history = UserSequence(user.user_id, user.items[:-1])
        tokens = self.vocab.encode(sequence_to_page_log(history, self.history_items)).tokens.tolist()
        assert tokens[-1] == EOS
        return tokens[:-1], self.vocab.items.index.get(user.items[-1], -1)

    def rank(self, params, users: list[UserSequence], filter_seen: bool = False) -> np.ndarray:
        """0-based ranks of each user's last item given the rest (infinity: not found by beam search);
        `filter_seen` removes every history item from the ranking, as RecBole and eSASRec do: a target the
        user already had is then never ranked (infinity)."""
        out = []
        index = self.vocab.items.index
        for start in range(0, len(users), self.batch_size):
            chunk = users[start:start + self.batch_size]
            encoded = [self.encode(user) for user in chunk]
            tokens, lengths = pad_prompts([seq for seq, _ in encoded], self.batch_size, self.seq_len)
            targets = np.zeros(self.batch_size, np.int32)
            targets[:len(chunk)] = [target for _, target in encoded]
            seen = np.zeros((self.batch_size, len(self.vocab.items.item_ids)), bool)
            for row, user in enumerate(chunk):
                if filter_seen:
                    seen[row, [index[i] for i in user.items[:-1] if i in index]] = True
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


def make_ranker(trainer, vocab: Vocabulary, cfg, method: str | None = None) -> NextItemRanker:
    """The ranker a run's config asks for (`eval.ranking`, `auto`: by scoring for atomic item tokens,
    by beam search for semantic IDs), or `method` when given."""
    method = method or cfg.eval.ranking
    if method == "auto":
        method = "score" if vocab.items.tokens_per_item == 1 else "beam"
    return NextItemRanker(trainer, vocab, cfg.data.seq_len, cfg.eval.batch_size, method, cfg.eval.beam_size)


def validation_users(source, max_users: int) -> list[UserSequence]:
    """The first `max_users` users of a validation/test split (deterministic order)."""
    n = len(source) if not max_users else min(max_users, len(source))
    return [example_to_sequence(source[k]) for k in range(n)]
