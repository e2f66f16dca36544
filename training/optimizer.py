"""AdamW with linear warmup + cosine decay, global-norm clipping and frozen parameter groups; optionally
row-wise Adagrad for the token embedding table (`train.embedding_optimizer`)."""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from homegen.model.lora import path_name

EMBEDDING_OPTIMIZERS = ("adamw", "rowwise_adagrad")
EMBEDDING_PATH = "embed"  # the token embedding table (V, D), tied to the output layer by default
# Row-wise Adagrad's default peak rate against the run's AdamW rate: at 1x the table learned too slowly (tiny
# world, 600 steps: validation loss 6.30 against AdamW's 5.11); at 10x it matched AdamW (5.18; docs/BENCHMARKS.md).
ROWWISE_RATE_FACTOR = 10.0


def learning_rate_schedule(train_cfg, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to `peak` (default `train.learning_rate`), then cosine decay to its final fraction."""
    peak = train_cfg.learning_rate if peak is None else peak
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=max(1, train_cfg.warmup_steps),
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1), end_value=peak * train_cfg.final_lr_fraction)


class RowwiseAdagradState(NamedTuple):
    sum_of_squares: optax.Params  # per leaf, one accumulator per row (leading axis)


def scale_by_rowwise_adagrad(eps: float = 1e-8) -> optax.GradientTransformation:
    """Row-wise Adagrad (as large-catalog recommenders train embedding tables: FBGEMM's rowwise Adagrad): each
    row of a leaf accumulates the mean square of its gradient and is scaled by one over its root. A row no
    batch touched has a zero gradient, so neither it nor its accumulator moves (no weight decay either), and
    the state is one number per row instead of AdamW's two per parameter."""

    def init(params):
        return RowwiseAdagradState(jax.tree.map(lambda p: jnp.zeros_like(p, shape=p.shape[:1]), params))

    def row_mean_square(g):
        return jnp.mean(jnp.square(g), axis=tuple(range(1, g.ndim)))

    def update(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda g, a: a + row_mean_square(g), updates, state.sum_of_squares)
        scaled = jax.tree.map(lambda g, a: g / (jnp.sqrt(a) + eps).reshape((-1,) + (1,) * (g.ndim - 1)), updates, sums)
        return scaled, RowwiseAdagradState(sums)

    return optax.GradientTransformation(init, update)


def frozen_mask(params, freeze: str):
    """True for parameters whose path ('blocks/attn/q', 'embed', ...) matches one of the comma-separated
    regular expressions in `freeze` (matched at the start of the path)."""
    patterns = [re.compile(p.strip()) for p in freeze.split(",") if p.strip()]
    return jax.tree_util.tree_map_with_path(lambda path, _: any(p.match(path_name(path)) for p in patterns),
                                            params)


def is_constant(leaf) -> bool:
    """Whether a state leaf is a constant table (integer dtype, e.g. `model.transformer.AttributeIds`), which
    is never trained nor counted as a parameter."""
    return not jnp.issubdtype(leaf.dtype, jnp.floating)


def make_optimizer(train_cfg, params) -> optax.GradientTransformation:
    """The run's optimizer; weight decay only on matrices; frozen groups and integer leaves (constant tables
    such as `model.transformer.AttributeIds`) get zero updates. With `train.embedding_optimizer=rowwise_adagrad`
    the token embedding table is trained by row-wise Adagrad at `train.embedding_learning_rate` (default:
    ROWWISE_RATE_FACTOR x the run's rate) on the same schedule; the global-norm clip still spans every trained parameter."""
    embedding_optimizer = train_cfg.get("embedding_optimizer", "adamw")  # absent in configs older than it
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"train.embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, "
                         f"got {embedding_optimizer!r}")
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                        weight_decay=train_cfg.weight_decay, mask=decay_mask)
    frozen = jax.tree.map(lambda f, p: f or is_constant(p), frozen_mask(params, train_cfg.freeze), params)
    rowwise = embedding_optimizer == "rowwise_adagrad"
    labels = jax.tree_util.tree_map_with_path(
        lambda path, f: "frozen" if f else "embedding" if rowwise and path_name(path) == EMBEDDING_PATH else "trained",
        frozen)
    groups = set(jax.tree.leaves(labels))
    if rowwise and "embedding" not in groups:
        raise ValueError(f"train.embedding_optimizer=rowwise_adagrad: no trained parameter {EMBEDDING_PATH!r} "
                         "(frozen, or a LoRA run)")
    if groups == {"trained"}:
        return optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), adamw)
    if not rowwise:
        return optax.multi_transform({"trained": optax.chain(optax.clip_by_global_norm(train_cfg.clip_norm), adamw),
                                      "frozen": optax.set_to_zero()}, labels)
    embedding_rate = train_cfg.embedding_learning_rate or ROWWISE_RATE_FACTOR * train_cfg.learning_rate
    rowwise_adagrad = optax.chain(scale_by_rowwise_adagrad(),
                                  optax.scale_by_learning_rate(learning_rate_schedule(train_cfg, embedding_rate)))
    return optax.chain(optax.masked(optax.set_to_zero(), jax.tree.map(lambda label: label == "frozen", labels)),
                       optax.clip_by_global_norm(train_cfg.clip_norm),
                       optax.multi_transform({"trained": adamw, "embedding": rowwise_adagrad,
                                              "frozen": optax.set_to_zero()}, labels))
