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


def token_log_probs(model: Transformer, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Log-probability of targets[...] under the full softmax of hidden (..., D): the reference's, a
    preference pair's policy's and a teacher-forced score's, computed one way."""
    logits = model.logits(hidden)
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def full_softmax_loss(model: Transformer, hidden: jax.Array, targets: jax.Array, weights: jax.Array,
                      chunk: int | None = None, label_smoothing: float = 0.0):
    """(sum of weight x cross-entropy, sum of weights) over all positions; with `chunk` smaller than the
    vocabulary, the normaliser is summed chunk by chunk (`chunked_logsumexp`). With `label_smoothing` e, the
    target distribution is (1 - e) on the target plus e spread evenly over the vocabulary."""
    if chunk is not None and chunk < model.cfg.vocab_size:
        if label_smoothing:
            raise ValueError("label smoothing needs the whole logits: chunked losses are for evaluation")
        ce = chunked_logsumexp(model, hidden, chunk) - model.pointwise_logits(hidden, targets)
        return jnp.sum(ce * weights), jnp.sum(weights)
    logits = model.logits(hidden)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        target_logit = (1.0 - label_smoothing) * target_logit + label_smoothing * jnp.mean(logits, axis=-1)
    ce = jax.nn.logsumexp(logits, axis=-1) - target_logit
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


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """DPO (Rafailov et al., 2023) on pairs of pages of one prompt, against a frozen reference whose
    log-probabilities come with the pairs."""

    beta: float = 0.1  # how far the policy may move from the reference: the implicit reward's scale
    chosen_nll_weight: float = 0.0  # + this x the chosen page's mean next-token loss (keeps it likely)
    value_weight: float = 1.0  # + this x the value head's divergence from the pairs' stream probabilities


def preference_loss(token_logp: jax.Array, page_mask: jax.Array, ref_log_probs: jax.Array, cfg: PreferenceConfig,
                    value_logits: jax.Array | None = None, value_targets: jax.Array | None = None):
    """(loss summed over pairs, number of pairs, sums for metrics) for rows (2N, T) that alternate chosen and
    rejected pages: `token_logp` of each target token, `page_mask` 1 on the page's tokens, `ref_log_probs`
    (N, 2). The DPO loss of a pair is -log sigmoid(beta x (gain of chosen - gain of rejected)), a page's
    gain being its log-probability minus the reference's. With `value_logits`, the value head's binary
    cross-entropy to the soft targets `value_targets` (>= 0 where labelled), less their entropy (so 0 when
    it agrees), is added per labelled token, weighted like the main loss's value term."""
    pairs = ref_log_probs.shape[0]
    page_log_probs = jnp.sum(token_logp * page_mask, axis=-1).reshape(pairs, 2)
    gain = page_log_probs - ref_log_probs
    margin = cfg.beta * (gain[:, 0] - gain[:, 1])
    total = jnp.sum(jax.nn.softplus(-margin))
    aux = {"accuracy_sum": jnp.sum(margin > 0), "margin_sum": jnp.sum(margin)}
    if cfg.chosen_nll_weight:
        chosen_logp, chosen_mask = token_logp.reshape(pairs, 2, -1)[:, 0], page_mask.reshape(pairs, 2, -1)[:, 0]
        nll = -jnp.sum(chosen_logp * chosen_mask, axis=-1) / jnp.maximum(jnp.sum(chosen_mask, axis=-1), 1.0)
        total += cfg.chosen_nll_weight * jnp.sum(nll)
    if value_logits is not None:
        labelled = value_targets >= 0
        p = jnp.clip(value_targets, 1e-6, 1 - 1e-6)
        entropy = -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))
        divergence = jnp.logaddexp(0.0, value_logits) - p * value_logits - entropy
        value_sum, value_count = jnp.sum(jnp.where(labelled, divergence, 0.0)), jnp.sum(labelled.astype(jnp.float32))
        total += cfg.value_weight * value_sum / jnp.maximum(value_count, 1.0) * pairs
        aux.update(value_sum=value_sum, value_count=value_count)
    return total, jnp.float32(pairs), aux
