"""Next-token losses over the item-token interface: full softmax, or sampled softmax for large atomic
item vocabularies (every non-item token plus shared sampled item negatives, with logQ correction)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from homegen.data.vocab import NO_OUTCOME, STREAMED
from homegen.model.transformer import Transformer

SAMPLERS = ("uniform", "popularity")


@dataclasses.dataclass(frozen=True)
class SampledSoftmax:
    """Negatives are drawn from items [item_offset, vocab_size) with probabilities `item_probs`."""

    item_offset: int
    item_log_probs: np.ndarray  # (num_items,) log sampling probability of each item
    num_negatives: int
    item_cdf: np.ndarray  # (num_items,) cumulative sampling probability, for inverse-CDF draws

    @classmethod
    def create(cls, item_offset: int, item_counts: np.ndarray, num_negatives: int, sampler: str) -> SampledSoftmax:
        if sampler not in SAMPLERS:
            raise ValueError(f"loss.sampler must be one of {SAMPLERS}, got {sampler!r}")
        weights = np.ones(len(item_counts)) if sampler == "uniform" else np.asarray(item_counts, np.float64) ** 0.75 + 1.0
        probs = weights / weights.sum()
        return cls(item_offset, np.log(probs).astype(np.float32), num_negatives, np.cumsum(probs).astype(np.float32))

    def draw(self, key: jax.Array) -> jax.Array:
        """`num_negatives` item indices drawn with replacement, by inverse CDF: O(K log N), where
        `jax.random.categorical` would draw K x N Gumbel variates (12x slower than the full softmax at 10^5
        items with 8,192 negatives, docs/BENCHMARKS.md)."""
        u = jax.random.uniform(key, (self.num_negatives,))
        index = jnp.searchsorted(jnp.asarray(self.item_cdf), u, side="right")
        return jnp.minimum(index, len(self.item_cdf) - 1)


def chunked_logsumexp(model: Transformer, hidden: jax.Array, chunk: int) -> jax.Array:
    """logsumexp over the whole vocabulary of the logits of hidden (..., D), `chunk` tokens at a time, so
    that memory holds positions x chunk logits instead of positions x vocabulary (no gradient is kept
    bounded by this: it is for evaluation)."""
    vocab = model.cfg.vocab_size

    def add_chunk(total, start):
        ids = start + jnp.arange(chunk)
        logits = jnp.where(ids < vocab, model.logits(hidden, jnp.minimum(ids, vocab - 1)), -jnp.inf)
        return jnp.logaddexp(total, jax.nn.logsumexp(logits, axis=-1)), None

    total, _ = jax.lax.scan(add_chunk, jnp.full(hidden.shape[:-1], -jnp.inf), jnp.arange(0, vocab, chunk))
    return total


def full_softmax_loss(model: Transformer, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                      chunk: int | None = None):
    """(sum of weight x cross-entropy, sum of weights) over all positions; with `chunk` smaller than the
    vocabulary, the normaliser is summed chunk by chunk (`chunked_logsumexp`)."""
    if chunk is not None and chunk < model.cfg.vocab_size:
        ce = chunked_logsumexp(model, hidden, chunk) - model.pointwise_logits(hidden, targets)
        return jnp.sum(ce * weights), jnp.sum(weights)
    logits = model.logits(hidden)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * weights), jnp.sum(weights)


def sampled_softmax_loss(model: Transformer, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                         sampler: SampledSoftmax, key: jax.Array):
    """Sampled-softmax estimate of the same loss: candidates are all non-item tokens, `num_negatives`
    items drawn with replacement (shared by the batch) minus the target, and the target itself."""
    offset = sampler.item_offset
    log_q = jnp.asarray(sampler.item_log_probs)
    negatives = sampler.draw(key)
    fixed = model.logits(hidden, jnp.arange(offset))  # (B, T, offset)
    sampled = model.logits(hidden, negatives + offset) - (log_q[negatives] + jnp.log(sampler.num_negatives))
    is_item = targets >= offset
    sampled = jnp.where((negatives + offset)[None, None, :] == targets[..., None], -jnp.inf, sampled)
    target_logit = model.pointwise_logits(hidden, targets)
    item_target = jnp.where(is_item, target_logit, -jnp.inf)
    all_logits = jnp.concatenate([fixed, sampled, item_target[..., None]], axis=-1)
    ce = jax.nn.logsumexp(all_logits, axis=-1) - target_logit
    return jnp.sum(ce * weights), jnp.sum(weights)


def value_loss(model: Transformer, hidden: jax.Array, targets: jax.Array, outcomes: jax.Array):
    """(sum of binary cross-entropies of the value head, number of labelled positions): whether each
    logged target item was streamed (`outcomes` as in `data.vocab.Encoded`)."""
    logits = model.values(hidden, targets)
    labelled = (outcomes != NO_OUTCOME).astype(jnp.float32)
    streamed = (outcomes == STREAMED).astype(jnp.float32)
    bce = jnp.logaddexp(0.0, logits) - streamed * logits
    return jnp.sum(bce * labelled), jnp.sum(labelled)
