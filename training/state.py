"""The sharded training state and the jitted train / eval steps.

State is a plain pytree {"params", "opt_state", "step"}; parameters are nested dicts (nnx pure dicts)
whose shardings come from each parameter's `logical_axes` metadata and the config's rules. The state is
created inside `jit` with `out_shardings`, so it is never whole on one device. With LoRA the state's
"params" are the adapters alone; the model's own parameters (`Trainer.base`) are an input of every step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from homegen.model import lora
from homegen.model.loss import (
    PreferenceConfig,
    SampledSoftmax,
    full_softmax_loss,
    preference_loss,
    sampled_softmax_loss,
    token_log_probs,
    value_loss,
)
from homegen.model.sharding import logical_to_spec, use_mesh
from homegen.model.transformer import Transformer, TransformerConfig, abstract_model
from homegen.training.optimizer import is_constant, learning_rate_schedule, make_optimizer

BATCH_KEYS = ("tokens", "weights", "outcomes", "segment_ids", "positions")
PAIR_KEYS = ("tokens", "lengths", "page_mask", "values", "ref_log_probs")  # training.preference batches
EVAL_VOCAB_CHUNK = 32_768  # validation logits held at once per position (a 10^6-item vocabulary: 31 chunks)


@dataclasses.dataclass
class Trainer:
    """Everything a run needs to create, step and evaluate its state on a mesh."""

    model_cfg: TransformerConfig
    train_cfg: object
    mesh: Mesh
    rules: list
    sampled: SampledSoftmax | None = None
    seed: int = 0
    value_weight: float = 1.0  # weight of the value head's loss against the next-token loss
    lora: lora.LoraConfig | None = None  # train adapters on `base` instead of the parameters themselves
    preference: PreferenceConfig | None = None  # how batches of preference pairs are scored (DPO)
    label_smoothing: float = 0.0  # full-softmax training loss: this share of each target spread over the vocabulary
    attribute_table: np.ndarray | None = None  # new parameters' AttributeIds (Vocabulary.attribute_table)
    attribute_word_table: np.ndarray | None = None  # and their attribute words (Vocabulary.attribute_word_table)

    def __post_init__(self):
        self.graphdef, abstract_params, self.param_axes = abstract_model(self.model_cfg)
        self.param_shardings = self._shardings(self.param_axes)
        self.abstract_params = abstract_params
        self.base = None  # the model's parameters under LoRA adapters (set before training)
        if self.lora:
            if self.train_cfg.freeze:
                raise ValueError("finetune.lora_rank trains only the adapters: leave train.freeze empty")
            self.lora_paths = lora.target_paths(self.param_axes, self.lora.targets)
            self._make_trained = lambda key: lora.init_adapters(  # noqa: E731
                abstract_params, self.param_axes, self.lora_paths, self.lora.rank, key)
            abstract_trained = jax.eval_shape(self._make_trained, jax.random.key(0))
            self.trained_shardings = self._shardings(lora.adapter_axes(self.param_axes, self.lora_paths))
        else:
            self._make_trained = self._make_params
            abstract_trained, self.trained_shardings = abstract_params, self.param_shardings
        self.abstract_trained = abstract_trained
        self.tx = make_optimizer(self.train_cfg, abstract_trained)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        # Optimizer moments follow their parameters: let XLA propagate the shardings through `init`.
        sharded_params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                                      abstract_trained, self.trained_shardings)
        propagated = jax.jit(self.tx.init).lower(sharded_params).compile().output_shardings
        opt_shardings = jax.tree.map(  # scalars (step counts) come back on one device: replicate them
            lambda s: s if isinstance(s, NamedSharding) and s.mesh == self.mesh else self.replicated, propagated)
        self.state_shardings = {"params": self.trained_shardings, "opt_state": opt_shardings,
                                "step": self.replicated}
        # Rows over the batch axes; any further axes (pairs' chosen/rejected, length) whole.
        self.batch_sharding = NamedSharding(self.mesh, logical_to_spec(("batch",), self.rules))
        self.schedule = learning_rate_schedule(self.train_cfg)
        base_shardings = self.param_shardings if self.lora else None
        self._train_step = jax.jit(self._train_step_impl,
                                   in_shardings=(self.state_shardings, base_shardings, self.batch_sharding),
                                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
        self._eval_step = jax.jit(self._eval_step_impl, in_shardings=(self.param_shardings, self.batch_sharding),
                                  out_shardings=self.replicated)
        self._merge = jax.jit(self._model_params, in_shardings=(self.trained_shardings, base_shardings),
                              out_shardings=self.param_shardings)

    def _make_params(self, key: jax.Array) -> dict:
        params = nnx.to_pure_dict(nnx.state(Transformer(self.model_cfg, nnx.Rngs(params=key))))
        for name, table in (("attribute_ids", self.attribute_table), ("attribute_words", self.attribute_word_table)):
            if name in params:
                expected = params[name].shape
                if table is None or table.shape != expected:
                    raise ValueError(f"new parameters with item attributes need a {name} table of shape {expected}, "
                                     f"got {None if table is None else table.shape}")
                params[name] = jnp.asarray(table, jnp.int32)
        return params

    def fresh_params(self) -> dict:
        """New model parameters from the seed, sharded (what a LoRA benchmark trains adapters on)."""
        with use_mesh(self.mesh, self.rules):
            return jax.jit(self._make_params, out_shardings=self.param_shardings)(jax.random.key(self.seed))

    def _shardings(self, axes_tree):
        return jax.tree.map(lambda axes: NamedSharding(self.mesh, logical_to_spec(axes, self.rules)), axes_tree,
                            is_leaf=lambda x: isinstance(x, tuple))

    # --- state ---------------------------------------------------------------------------------------
    def _state_from(self, trained) -> dict:
        return {"params": trained, "opt_state": self.tx.init(trained), "step": jnp.zeros((), jnp.int32)}

    def init_state(self, params=None) -> dict:
        """A fresh sharded state: new parameters (or adapters) from the seed, or the given parameters
        (fine-tuning without adapters)."""
        with use_mesh(self.mesh, self.rules):
            if params is not None:
                return jax.jit(self._state_from, in_shardings=(self.trained_shardings,),
                               out_shardings=self.state_shardings)(params)
            create = lambda key: self._state_from(self._make_trained(key))  # noqa: E731
            return jax.jit(create, out_shardings=self.state_shardings)(jax.random.key(self.seed))

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with this mesh's shardings (the target of a restore)."""
        shapes = jax.eval_shape(lambda: self._state_from(self.abstract_trained))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def abstract_model_params(self) -> dict:
        """The model's parameters as ShapeDtypeStructs with this mesh's shardings (a base run's restore target)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.abstract_params, self.param_shardings)

    def _model_params(self, trained, base):
        return lora.merge(base, trained, self.lora.scale) if self.lora else trained

    def model_params(self, trained) -> dict:
        """The parameters the model runs with: the trained ones, or `base` with the adapters merged in."""
        if not self.lora:
            return trained
        with use_mesh(self.mesh, self.rules):
            return self._merge(trained, self.base)

    # --- steps ---------------------------------------------------------------------------------------
    def _loss(self, params, batch, key, train: bool):
        """(loss sum, weight sum, sums for metrics): next-token cross-entropy (weighted in training, every
        target once in evaluation), plus `value_weight` x the value head's cross-entropy when there is one;
        for a batch of preference pairs, their DPO loss (`_preference_loss`)."""
        if "page_mask" in batch:
            return self._preference_loss(params, batch, key, train)
        model = nnx.merge(self.graphdef, params)
        inputs = batch["tokens"][:, :-1]
        targets, weights = batch["tokens"][:, 1:], batch["weights"][:, 1:]
        dropout_key, sample_key = (None, None) if key is None else tuple(jax.random.split(key))
        hidden, _ = model.hidden(inputs, batch["positions"][:, :-1], batch["segment_ids"][:, :-1],
                                 dropout_key=dropout_key if train else None)
        if not train:  # the exact loss, its normaliser summed in vocabulary chunks to bound memory
            loss, weight = full_softmax_loss(model, hidden, targets, (weights > 0).astype(jnp.float32),
                                             chunk=EVAL_VOCAB_CHUNK)
        elif self.sampled is not None:
            loss, weight = sampled_softmax_loss(model, hidden, targets, weights, self.sampled, sample_key)
        else:
            loss, weight = full_softmax_loss(model, hidden, targets, weights, label_smoothing=self.label_smoothing)
        if not self.model_cfg.value_head:
            return loss, weight, {}
        value_sum, labelled = value_loss(model, hidden, targets, batch["outcomes"][:, 1:])
        total = loss + self.value_weight * value_sum * weight / jnp.maximum(labelled, 1.0) if train else loss
        return total, weight, {"value_sum": value_sum, "value_count": labelled}

    def _preference_loss(self, params, batch, key, train: bool):
        """`model.loss.preference_loss` of pairs (`training.preference`): the page tokens' log-probabilities
        under the model (dropout in training), and the value head at the labelled item tokens."""
        if self.preference is None:
            raise ValueError("a batch of preference pairs needs the trainer's `preference` settings")
        model = nnx.merge(self.graphdef, params)
        pairs, _, length = batch["tokens"].shape
        rows = lambda x: x.reshape(2 * pairs, *x.shape[2:])  # noqa: E731 (chosen, rejected, chosen, ...)
        tokens = rows(batch["tokens"])
        positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
        segments = (positions < rows(batch["lengths"])[:, None]).astype(jnp.int32)
        hidden, _ = model.hidden(tokens[:, :-1], positions[:, :-1], segments[:, :-1],
                                 dropout_key=key if train else None)
        targets = tokens[:, 1:]
        token_logp = token_log_probs(model, hidden, targets)
        values = None
        if self.model_cfg.value_head and self.preference.value_weight:
            values = model.values(hidden, targets)
        return preference_loss(token_logp, rows(batch["page_mask"])[:, 1:], batch["ref_log_probs"], self.preference,
                               values, rows(batch["values"])[:, 1:])

    def _train_step_impl(self, state, base, batch):
        accum = self.train_cfg.grad_accum
        key = jax.random.fold_in(jax.random.key(self.seed + 1), state["step"])
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def loss_fn(trained, b, k):
            loss, weight, value = self._loss(self._model_params(trained, base), b, k, True)
            return loss, (weight, value)

        # Integer leaves (constant tables) get float0 gradients: zeros of their own type instead.
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)
        as_zero = lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g  # noqa: E731

        def accumulate(carry, inputs):
            grads, loss_sum, weight_sum, sums = carry
            b, k = inputs
            (loss, (weight, v)), g = grad_fn(state["params"], b, k)
            g = jax.tree.map(as_zero, g, state["params"])
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, weight_sum + weight,
                    jax.tree.map(jnp.add, sums, v)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        keys = jax.random.split(key, accum)
        first = jax.tree.map(lambda x: x[0], micro)
        sum_shapes = jax.eval_shape(lambda: loss_fn(state["params"], first, keys[0])[1][1])
        sum_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sum_shapes)
        (grads, loss_sum, weight_sum, sums), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, sum_zeros),
                                                              (micro, keys))
        grads = jax.tree.map(lambda g: g if is_constant(g) else g / jnp.maximum(weight_sum, 1e-9), grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss_sum / jnp.maximum(weight_sum, 1e-9), "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state["step"]), "target_weight": weight_sum}
        if "value_sum" in sums:
            metrics["value_loss"] = sums["value_sum"] / jnp.maximum(sums["value_count"], 1.0)
        if "accuracy_sum" in sums:
            metrics["preference_accuracy"] = sums["accuracy_sum"] / jnp.maximum(weight_sum, 1.0)
            metrics["reward_margin"] = sums["margin_sum"] / jnp.maximum(weight_sum, 1.0)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def _eval_step_impl(self, params, batch):
        loss_sum, count, value = self._loss(params, batch, None, False)
        return {"loss_sum": loss_sum, "count": count, **value}

    def train_step(self, state, batch):
        with use_mesh(self.mesh, self.rules):
            return self._train_step(state, self.base, batch)

    def step_flops(self, state, batch) -> float | None:
        """XLA's own count of the floating-point operations of one compiled training step on `batch`, all
        devices together (its cost analysis of the per-device program, times the devices); None where the
        backend gives no count."""
        with use_mesh(self.mesh, self.rules):
            compiled = self._train_step.lower(state, self.base, batch).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        if not analysis or "flops" not in analysis:
            return None
        return float(analysis["flops"]) * self.mesh.size

    def eval_step(self, params, batch):
        with use_mesh(self.mesh, self.rules):
            return self._eval_step(params, batch)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A global batch from this process's rows (of logged pages, or of preference pairs)."""
        keys = PAIR_KEYS if "page_mask" in local else BATCH_KEYS
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k])) for k in keys}


def count_params(params) -> int:
    """Number of trainable (floating-point) values; constant integer tables are not parameters."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params) if not is_constant(p)))
