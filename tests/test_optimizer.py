"""The optimizer (training/optimizer.py): row-wise Adagrad on the embedding table against hand-computed updates,
AdamW unchanged on the rest, frozen groups still, and the clip spanning both groups."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from homegen.training.optimizer import make_optimizer


def _train_cfg(**changes) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(dict(
        steps=100, learning_rate=0.1, final_lr_fraction=1.0, warmup_steps=0, weight_decay=0.01, clip_norm=1e9,
        b1=0.9, b2=0.98, freeze="", embedding_optimizer="rowwise_adagrad", embedding_learning_rate=0.0))
    cfg.update(changes)
    return cfg


def _params():
    return {"embed": jnp.ones((4, 3)), "blocks": {"q": jnp.full((3, 3), 0.5), "scale": jnp.ones((3,))}}


def _grads():
    embed = jnp.array([[0.3, -0.4, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    return {"embed": embed, "blocks": {"q": jnp.full((3, 3), 0.2), "scale": jnp.full((3,), -0.1)}}


def test_rowwise_adagrad_moves_touched_rows_by_their_root_mean_square_and_leaves_the_rest():
    params, grads = _params(), _grads()
    tx = make_optimizer(_train_cfg(warmup_steps=1), params)  # warmup of one step: the rates are full from step 1
    state = tx.init(params)
    sums = [leaf for leaf in optax.tree_utils.tree_get_all_with_path(state, "sum_of_squares")][0][1]
    assert sums["embed"].shape == (4,)  # one number per row, not two per parameter
    updates = None
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    # Step 2: each row's accumulator holds twice its gradient's mean square; the update is -lr g / sqrt(that).
    embed = np.asarray(grads["embed"])
    expected = -1.0 * embed / (np.sqrt(2 * np.mean(embed**2, axis=1, keepdims=True)) + 1e-8)  # 10x the run's 0.1
    np.testing.assert_allclose(np.asarray(updates["embed"]), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(params["embed"])[[1, 3]], np.ones((2, 3)))  # untouched rows stay

    adamw_only = make_optimizer(_train_cfg(warmup_steps=1, embedding_optimizer="adamw"), _params())
    adamw_state, adamw_params = adamw_only.init(_params()), _params()
    for _ in range(2):
        adamw_updates, adamw_state = adamw_only.update(grads, adamw_state, adamw_params)
        adamw_params = optax.apply_updates(adamw_params, adamw_updates)
    for path in (("blocks", "q"), ("blocks", "scale")):  # the rest is AdamW either way
        np.testing.assert_allclose(np.asarray(params[path[0]][path[1]]), np.asarray(adamw_params[path[0]][path[1]]),
                                   rtol=1e-6)
    assert not np.allclose(np.asarray(adamw_params["embed"])[1], 1.0)  # AdamW's weight decay moves every row


def _last_update(tx, grads_sequence, params):
    """The update of the last of a sequence of steps (the schedule's rate is 0 at the first)."""
    state = tx.init(params)
    for grads in grads_sequence:
        updates, state = tx.update(grads, state, params)
    return updates


def _second_update(tx, grads, params):
    return _last_update(tx, [grads, grads], params)


def test_the_clip_spans_both_groups_and_frozen_parameters_stay():
    """A step whose gradients are 10x the others', clipped back to their norm, moves both groups as an unclipped
    step of the usual gradients does (both optimizers remember gradient scales, so a group outside the clip
    would move differently)."""
    params, grads = _params(), _grads()
    norm = float(optax.tree.norm(grads))
    large = jax.tree.map(lambda g: 10 * g, grads)
    clipped = _last_update(make_optimizer(_train_cfg(clip_norm=norm * 1.0001, embedding_learning_rate=0.5), params),
                           [grads, grads, large], params)
    plain = _last_update(make_optimizer(_train_cfg(embedding_learning_rate=0.5), params), [grads] * 3, params)
    unclipped = _last_update(make_optimizer(_train_cfg(embedding_learning_rate=0.5), params),
                             [grads, grads, large], params)
    for x, y in zip(jax.tree.leaves(clipped), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-7)
    for group in ("embed", "blocks"):  # the clip made the difference in both
        assert not np.allclose(np.asarray(jax.tree.leaves(unclipped[group])[0]),
                               np.asarray(jax.tree.leaves(plain[group])[0]), rtol=1e-2)

    updates = _second_update(make_optimizer(_train_cfg(freeze="blocks/q"), params), grads, params)
    assert not np.any(np.asarray(updates["blocks"]["q"])) and np.any(np.asarray(updates["embed"]))
    with pytest.raises(ValueError, match="no trained parameter 'embed'"):
        make_optimizer(_train_cfg(freeze="embed"), params)
    with pytest.raises(ValueError, match="train.embedding_optimizer must be one of"):
        make_optimizer(_train_cfg(embedding_optimizer="adagrad"), params)
