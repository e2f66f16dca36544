"""The decoder-only transformer (Flax NNX): token embeddings, RoPE, pre-norm RMSNorm, SwiGLU MLP and
multi-head / grouped-query attention through `jax.nn.dot_product_attention`.

One forward serves training and KV-cache decoding: attention reads keys and values either from the
current tokens (training, prefill without cache) or from a pre-allocated `KVCache` that the call writes
into. Layers are stacked on a leading "layers" axis and run with `lax.scan` (unrolled when
`scan_layers=False`), optionally rematerialised.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from homegen.model.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    dropout: float = 0.0  # on each block's residual branches, in training
    embed_dropout: float = 0.0  # on the input token embeddings, in training (SASRec's embedding dropout)
    tie_embeddings: bool = True
    rope_base: float = 10_000.0
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Uncached (training, scoring) attention through cuDNN's fused flash-attention kernel where the backend is a
    # GPU and the compute dtype is bfloat16/float16; XLA's attention elsewhere and while decoding from a cache.
    fused_attention: bool = False
    value_head: bool = False  # also predict whether each item token would be streamed (see `values`)
    # Item attributes (data/attributes.py): ids 1..num_attributes, at most attributes_per_item per token; a
    # token's embedding adds the mean of its attributes' embeddings (0: no attributes).
    num_attributes: int = 0
    attributes_per_item: int = 0
    # > 0: each attribute's embedding also adds the mean embedding of (at most this many) text tokens of its
    # value (Vocabulary.attribute_word_table), the tokens intents are written in.
    attribute_words: int = 0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if (self.num_attributes > 0) != (self.attributes_per_item > 0):
            raise ValueError("num_attributes and attributes_per_item are both set or both 0")
        if self.attribute_words and not self.num_attributes:
            raise ValueError("attribute_words needs item attributes (num_attributes > 0)")

    def num_params(self) -> int:
        d, h, k, hd, m = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        per_layer = d * hd * (2 * h + 2 * k) + 3 * d * m + 2 * d
        value = d * d + self.vocab_size if self.value_head else 0
        attributes = (self.num_attributes + 1) * d if self.num_attributes else 0
        return (self.num_layers * per_layer + self.vocab_size * d * (1 if self.tie_embeddings else 2) + d + value
                + attributes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for `slots` token positions, and the segment id of each slot (0 = empty)."""

    k: jax.Array  # (layers, batch, slots, kv_heads, head_dim)
    v: jax.Array
    segment_ids: jax.Array  # (batch, slots)
    index: jax.Array  # scalar int32: first free slot

    @classmethod
    def zeros(cls, config: TransformerConfig, batch: int, slots: int) -> KVCache:
        shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
        dtype = jnp.dtype(config.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), jnp.int32),
                   jnp.zeros((), jnp.int32))

    def repeat(self, n: int) -> KVCache:
        """Each batch row n times in a row (a prefilled prompt's cache for each of its n beams)."""
        return KVCache(jnp.repeat(self.k, n, axis=1), jnp.repeat(self.v, n, axis=1),
                       jnp.repeat(self.segment_ids, n, axis=0), self.index)

    def take(self, rows: jax.Array) -> KVCache:
        """The batch rows `rows` (R,), in that order (the caches of the beams that go on)."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.segment_ids[rows], self.index)


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
    fan_in = shape[0] if scale is None else None
    std = scale if scale is not None else 1.0 / math.sqrt(fan_in)
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, logical_axes=axes)


class AttributeIds(nnx.Variable):
    """A constant int table (vocab, attributes_per_item) of each token's attribute ids: saved and sharded
    with the parameters, never trained (the optimizer freezes integer leaves)."""


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of x (B, T, heads, head_dim) at integer positions (B, T)."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, :, None, None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype) * self.scale[...].astype(x.dtype)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        pd, d, hd = jnp.dtype(cfg.param_dtype), cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.q = _param(rngs, (d, cfg.num_heads, hd), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, (d, cfg.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, (d, cfg.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, (cfg.num_heads, hd, d), ("heads", "head_dim", "embed"), pd,
                        scale=1.0 / math.sqrt(cfg.num_heads * hd * 2 * cfg.num_layers))

    def __call__(self, x, positions, segment_ids, cache_kv, layer, cache_segments, cache_index):
        """x (B, T, D). With a cache (the stacked k, v of every layer, (L, B, S, K, H)), the T new keys are
        written into layer `layer` at slots [cache_index, cache_index + T), in place, and attention reads
        every slot of that layer."""
        dt = x.dtype
        q = rope(jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt)), positions, self.cfg.rope_base)
        k = rope(jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt)), positions, self.cfg.rope_base)
        v = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        t = x.shape[1]
        if cache_kv is None:
            keys, values, key_segments, query_slot = k, v, segment_ids, jnp.arange(t)
        else:
            zero = jnp.zeros((), jnp.int32)
            start = (layer, zero, cache_index, zero, zero)
            cache_kv = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), start)
                             for c, new in zip(cache_kv, (k, v)))
            keys, values = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in cache_kv)
            key_segments, query_slot = cache_segments, cache_index + jnp.arange(t)
        if cache_kv is None and self.cfg.fused_attention and _fused_attention_available(dt):
            out = causal_segment_attention(q, k, v, segment_ids, implementation="cudnn")
        else:
            key_slot = jnp.arange(keys.shape[1])
            mask = ((key_slot[None, :] <= query_slot[:, None])[None]
                    & (segment_ids[:, :, None] == key_segments[:, None, :]) & (key_segments[:, None, :] > 0))
            mask = mask | (key_slot[None, None, :] == query_slot[None, :, None])  # padding attends to itself
            out = jax.nn.dot_product_attention(q, keys.astype(dt), values.astype(dt), mask=mask[:, None])
        out = jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dt))
        return out, cache_kv


def _fused_attention_available(dtype) -> bool:
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def causal_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                             implementation: str | None = None) -> jax.Array:
    """Causal attention within each packed segment of (B, T) `segment_ids` (0 = padding, which attends to
    itself only), with causality as the kernel's own mask type (so a fused kernel skips the blocks above the
    diagonal) and the segments as a (B, 1, T, T) mask shared by every head. q (B, T, N, H); k, v (B, T, K, H)."""
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    same = same | jnp.eye(q.shape[1], dtype=bool)[None]
    return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True, implementation=implementation)


class MLP(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        pd, d, m = jnp.dtype(cfg.param_dtype), cfg.d_model, cfg.mlp_dim
        self.gate = _param(rngs, (d, m), ("embed", "mlp"), pd)
        self.up = _param(rngs, (d, m), ("embed", "mlp"), pd)
        self.down = _param(rngs, (m, d), ("mlp", "embed"), pd, scale=1.0 / math.sqrt(m * 2 * cfg.num_layers))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        h = constrain(h, ("batch", "length", "mlp"))
        return h @ self.down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.d_model, pd)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, segment_ids, cache_kv, layer, cache_segments, cache_index, key):
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        h, cache_kv = self.attn(self.attn_norm(x), positions, segment_ids, cache_kv, layer, cache_segments,
                                cache_index)
        x = x + _dropout(h, self.cfg.dropout, keys[0])
        x = x + _dropout(self.mlp(self.mlp_norm(x)), self.cfg.dropout, keys[1])
        return constrain(x, ("batch", "length", "embed")), cache_kv


class Transformer(nnx.Module):
    """Token ids -> hidden states -> logits over the whole vocabulary (or a subset of token ids)."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd,
                            scale=1.0 / math.sqrt(cfg.d_model))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(layer_rngs: nnx.Rngs) -> Block:
            return Block(cfg, layer_rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.d_model, pd)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)
        if cfg.value_head:
            self.value_proj = _param(rngs, (cfg.d_model, cfg.d_model), ("embed", None), pd)
            self.value_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), pd), logical_axes=("vocab",))
        if cfg.num_attributes:  # row 0 (no attribute) is never read: masked in `_attribute_means`
            self.attribute_embed = _param(rngs, (cfg.num_attributes + 1, cfg.d_model), (None, "embed"), pd,
                                          scale=1.0 / math.sqrt(cfg.d_model))
            self.attribute_ids = AttributeIds(jnp.zeros((cfg.vocab_size, cfg.attributes_per_item), jnp.int32),
                                              logical_axes=("vocab", None))
        if cfg.attribute_words:  # text token ids of each attribute's value; PAD (0) is never read
            self.attribute_words = AttributeIds(jnp.zeros((cfg.num_attributes + 1, cfg.attribute_words), jnp.int32),
                                                logical_axes=(None, None))

    def _attribute_means(self, token_ids: jax.Array | None = None) -> jax.Array:
        """(..., D) mean attribute embedding of token_ids[...] (every token: (V, D)); zero for a token that
        has none (every token that is not an item)."""
        ids = self.attribute_ids[...] if token_ids is None else self.attribute_ids[...][token_ids]
        present = (ids > 0)[..., None]
        table = self.attribute_embed[...]
        if self.cfg.attribute_words:  # each attribute's row plus the mean embedding of its value's words
            words = self.attribute_words[...]
            has_word = (words > 0)[..., None]
            table = table + (jnp.where(has_word, self.embed[...][words], 0.0).sum(axis=1)
                             / jnp.maximum(has_word.sum(axis=1), 1))
        rows = jnp.where(present, table[ids], 0.0)
        return rows.sum(axis=-2) / jnp.maximum(present.sum(axis=-2), 1)

    def _embedding_rows(self, token_ids: jax.Array | None = None) -> jax.Array:
        """The embedding of token_ids[...] (every token: (V, D)): its own row, plus its attributes' mean."""
        rows = self.embed[...] if token_ids is None else self.embed[...][token_ids]
        return rows + self._attribute_means(token_ids) if self.cfg.num_attributes else rows

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: KVCache | None = None, dropout_key: jax.Array | None = None
               ) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states (B, T, D) and the updated cache (None without one)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = self._embedding_rows(tokens).astype(dt) * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if dropout_key is not None and cfg.embed_dropout > 0:
            dropout_key, embed_key = jax.random.split(dropout_key)
            x = _dropout(x, cfg.embed_dropout, embed_key)
        x = constrain(x, ("batch", "length", "embed"))
        graphdef, layers = nnx.split(self.blocks)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
        if cache is not None:
            t = tokens.shape[1]
            cache_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
            kv = (cache.k, cache.v)
        else:
            cache_segments, kv = None, None

        # The stacked cache rides in the scan's carry, so each layer updates its slots in place; as a scanned
        # input and output it was copied whole at every step (2.3x the attention's time at 4 rows).
        def layer(carry, inputs):
            x, stacked_kv = carry
            params, index, key = inputs
            return nnx.merge(graphdef, params)(x, positions, segment_ids, stacked_kv, index, cache_segments,
                                               None if cache is None else cache.index, key), None

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        (x, new_kv), _ = jax.lax.scan(layer, (x, kv), (layers, jnp.arange(cfg.num_layers), keys),
                                      unroll=1 if cfg.scan_layers else cfg.num_layers)
        x = self.final_norm(x)
        if cache is None:
            return x, None
        return x, KVCache(new_kv[0], new_kv[1], cache_segments, cache.index + t)

    def output_rows(self, token_ids: jax.Array | None = None) -> jax.Array:
        """The output embedding of token_ids[...] (every token: (V, D))."""
        if self.cfg.tie_embeddings:
            return self._embedding_rows(token_ids)
        head = self.head[...].T
        return head if token_ids is None else jnp.take(head, token_ids, axis=0)

    @staticmethod
    def _project(query: jax.Array, rows: jax.Array, pointwise: bool = False) -> jax.Array:
        """float32 scores of `query` (..., D) against `rows` (C, D): (..., C); with `pointwise`, against rows
        (..., D) position by position: (...)."""
        rows = rows.astype(query.dtype)
        if pointwise:
            return jnp.einsum("...d,...d->...", query, rows, preferred_element_type=jnp.float32)
        return jnp.einsum("...d,vd->...v", query, rows, preferred_element_type=jnp.float32)

    def logits(self, hidden: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """float32 logits of hidden (..., D) for every token, or for `token_ids` (C,) only."""
        out = self._project(hidden, self.output_rows(token_ids))
        return constrain(out, ("batch", "length", "vocab")) if out.ndim == 3 and token_ids is None else out

    def pointwise_logits(self, hidden: jax.Array, token_ids: jax.Array) -> jax.Array:
        """float32 logit of token_ids[...] at each position of hidden (..., D)."""
        return self._project(hidden, self.output_rows(token_ids), pointwise=True)

    def values(self, hidden: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
        """float32 stream logits of the value head: for every token (..., V), or for token_ids[...] at each
        position, the log-odds that the user streams that item if it is placed next, given the page so far
        (trained on logged item tokens only)."""
        query = hidden @ self.value_proj[...].astype(hidden.dtype)
        bias = self.value_bias[...]
        if token_ids is not None:
            return self._project(query, self._embedding_rows(token_ids), pointwise=True) + bias[token_ids]
        return self._project(query, self._embedding_rows()) + bias

    def __call__(self, tokens, positions, segment_ids, cache=None, dropout_key=None):
        hidden, cache = self.hidden(tokens, positions, segment_ids, cache, dropout_key)
        return self.logits(hidden), cache


def abstract_model(model_cfg: TransformerConfig) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, abstract params (ShapeDtypeStruct pure dict), logical axes pure dict)."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def axes_of(var: nnx.Variable):
        axes = tuple(var.get_metadata()["logical_axes"])
        return ("layers",) * (len(var.shape) - len(axes)) + axes

    axes: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = axes_of(var)
    return graphdef, nnx.to_pure_dict(state), axes
