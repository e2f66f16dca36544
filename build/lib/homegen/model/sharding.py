"""Logical axis names -> mesh axes.

Parameters carry `logical_axes` metadata (e.g. ("embed", "mlp")); activations are constrained with
`constrain(x, ("batch", "length", "embed"))`. The rules (a list of (logical, mesh axis or axes or None))
live in the config; `use_mesh(mesh, rules)` activates them while a step is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
_active: list[tuple[Mesh, dict]] = []


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for logical axes; a mesh axis is used at most once (later uses are replicated)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = table.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        used.update(names)
        spec.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activates the mesh and rules for `constrain` while tracing."""
    _active.append((mesh, dict(rules)))
    try:
        yield
    finally:
        _active.pop()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op outside `use_mesh`."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, list(rules.items()))))


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one entry of `shape` may be -1 (all remaining devices)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = 1
    for n in shape:
        if n != -1:
            if n < 1:
                raise ValueError(f"mesh axis sizes must be positive or -1, got {shape}")
            known *= n
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    total = shape[0] * shape[1] * shape[2]
    if total != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {total} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)
