"""LoRA adapters as a transform of the parameter tree: W' = W + (alpha / rank) x A @ B.

Every targeted matrix W (stacked over layers: (layers, *inputs, *outputs)) gets A (layers, fan_in, rank),
drawn like a dense layer's weights, and B (layers, rank, fan_out), zero, so that a fresh adapter leaves the
model unchanged. The model itself knows nothing of adapters: training differentiates the merged tree with
respect to A and B only, and serving merges once and runs the plain model.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

# A matrix's input dimensions end at its first axis of these (attention's output projection reads
# ("heads", "head_dim"); the others read "embed" or "mlp").
INPUT_AXES_END = ("embed", "mlp", "head_dim")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank, alpha (the update is scaled by alpha / rank) and `targets`, comma-separated regular expressions
    matched at the start of parameter paths, as `train.freeze` is ('blocks/attn,blocks/mlp')."""

    rank: int
    alpha: float
    targets: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def path_name(path) -> str:
    """'blocks/attn/q' for a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree) -> dict[str, object]:
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fan_split(axes: tuple) -> int:
    """How many leading non-layer axes of a matrix are its inputs."""
    inner = [a for a in axes if a != "layers"]
    return next((i + 1 for i, a in enumerate(inner) if a in INPUT_AXES_END), len(inner))


def target_paths(param_axes: dict, targets: str) -> list[str]:
    """Paths of the layer-stacked matrices whose path matches one of `targets` (an error names none found)."""
    patterns = [re.compile(p.strip()) for p in targets.split(",") if p.strip()]
    axes = _flat_axes(param_axes)
    found = [path for path, a in axes.items() if a and a[0] == "layers" and len(a) >= 3
             and any(p.match(path) for p in patterns)]
    if not found:
        raise ValueError(f"finetune.lora_targets={targets!r} matches no layer matrix; there are "
                         f"{', '.join(p for p, a in axes.items() if a and a[0] == 'layers' and len(a) >= 3)}")
    return found


def _flat_axes(param_axes: dict) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    return {path_name(p): a for p, a in leaves}


def _nest(flat: dict[str, dict]) -> dict:
    """{'blocks/attn/q': {...}} -> {'blocks': {'attn': {'q': {...}}}} (the parameter tree's own shape)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def _shapes(shape: tuple, axes: tuple) -> tuple[int, int, int]:
    """(layers, fan_in, fan_out) of a layer-stacked matrix."""
    split = _fan_split(axes) + 1
    return shape[0], int(np.prod(shape[1:split])), int(np.prod(shape[split:]))


def adapter_axes(param_axes: dict, paths: list[str]) -> dict:
    """Logical axes of the adapters: A shards like its matrix's input, B like its output."""
    axes = _flat_axes(param_axes)
    out = {}
    for path in paths:
        a = axes[path]
        split = _fan_split(a) + 1
        out[path] = {"a": ("layers", a[1] if split == 2 else None, None),
                     "b": ("layers", None, a[split] if len(a) == split + 1 else None)}
    return _nest(out)


def init_adapters(abstract_params: dict, param_axes: dict, paths: list[str], rank: int, key: jax.Array) -> dict:
    """{path: {"a", "b"}} for the matrices at `paths`: A ~ N(0, 1/fan_in), B = 0 (the model is unchanged)."""
    flat, axes = _flat(abstract_params), _flat_axes(param_axes)
    out = {}
    for i, path in enumerate(paths):
        layers, fan_in, fan_out = _shapes(flat[path].shape, axes[path])
        dtype = flat[path].dtype
        a = jax.random.normal(jax.random.fold_in(key, i), (layers, fan_in, rank), dtype) / math.sqrt(fan_in)
        out[path] = {"a": a, "b": jnp.zeros((layers, rank, fan_out), dtype)}
    return _nest(out)


def merge(params: dict, adapters: dict, scale: float) -> dict:
    """`params` with scale x A @ B added to every adapted matrix (in that matrix's dtype)."""
    flat = _flat(adapters)

    def add(path, w):
        name = path_name(path)
        if f"{name}/a" not in flat:
            return w
        a, b = flat[f"{name}/a"], flat[f"{name}/b"]
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(add, params)
