"""AdamW with linear warmup + cosine decay, global-norm clipping and frozen parameter groups."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from homegen.model.lora import path_name


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=max(1, train_cfg.warmup_steps),
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1), end_value=train_cfg.learning_rate * train_cfg.final_lr_fraction)


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
    such as `model.transformer.AttributeIds`) get zero updates."""
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                    weight_decay=train_cfg.weight_decay, mask=decay_mask))
    frozen = jax.tree.map(lambda f, p: f or is_constant(p), frozen_mask(params, train_cfg.freeze), params)
    if not any(jax.tree.leaves(frozen)):
        return tx
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
