"""Meshes, logical-axis rules and sharded parameter creation: the one place where model axes
meet device axes.

Every weight carries logical axis names (``layers.py``: embed, heads, mlp, proj, conv_in,
conv_out, norm, vocab, layers). ``DEFAULT_RULES`` maps them onto a mesh with axes
``data`` (pure data parallel), ``fsdp`` (data parallel whose devices also split the weights and
optimizer state, ZeRO-3 style) and ``tensor`` (attention heads and feed-forward split, Megatron
style). A dimension that an axis does not divide stays whole on that axis (logged by
``describe``), so tiny test models and odd widths still place.

Meshes use ``AxisType.Auto`` deliberately: parameters and batches get explicit shardings at
the jit boundary and XLA's sharding propagation places the activations in between. (jax's
default, Explicit, would put shardings into every intermediate's type and make each model op
state its output sharding.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated along that dimension).
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "proj": None,
    "conv_in": None,
    "conv_out": "fsdp",
    "vocab": "fsdp",
    "norm": None,
    "layers": None,
}


def mesh_shape(axes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolve one -1 entry to fill the devices; check the product equals ``n_devices``."""
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}: use {MESH_AXES}")
    sizes = dict(axes)
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    if any(n == 0 or n < -1 for n in sizes.values()):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(
                f"mesh {_fmt(sizes)}: the fixed axes need a multiple of {fixed} devices, "
                f"{n_devices} available"
            )
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices, {n_devices} "
            f"available: change the axis sizes (one may be -1 to take the rest)"
        )
    return sizes


def _fmt(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a}={n}" for a, n in sizes.items())


def make_mesh(axes: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) from e.g. ``{"data": -1, "fsdp": 4}``."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape({**{a: 1 for a in MESH_AXES}, **axes}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware device order where jax knows it (TPU slices, GPU hosts)
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 (CPU, odd shapes: plain order is fine)
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_for(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> P:
    """PartitionSpec of one array from its logical axes; axes that do not divide stay whole."""
    if not logical:
        return P()
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        if axis is None or axis in used or dim % mesh.shape[axis] or mesh.shape[axis] == 1:
            out.append(None)
        else:
            out.append(axis)
            used.add(axis)
    return P(*out)


def _logical(var: Any) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("logical_axes")


def state_shardings(
    state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> Any:
    """A NamedSharding for every variable of ``state`` (abstract or concrete), same tree."""

    def one(var: Any) -> Any:
        value = var.get_value() if hasattr(var, "get_value") else var
        return var.replace(NamedSharding(mesh, spec_for(_logical(var), value.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def loader_sharding(
    mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
) -> Callable[[tuple, Any], NamedSharding]:
    """For ``weights.loader.load_module(sharding=...)``: each tensor lands already sharded."""

    def sharding(path: tuple, var: Any) -> NamedSharding:
        value = var.get_value() if hasattr(var, "get_value") else var
        return NamedSharding(mesh, spec_for(_logical(var), value.shape, mesh, rules))

    return sharding


def init_sharded(
    make: Callable[[nnx.Rngs], nnx.Module],
    mesh: Mesh,
    *,
    seed: int = 0,
    rules: Mapping[str, str | None] = DEFAULT_RULES,
) -> tuple[Any, nnx.State]:
    """(graphdef, state) of ``make(rngs)`` created directly in its shards by one jitted init:
    shapes come from ``nnx.eval_shape``, so no device ever holds a whole copy."""
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(seed)))
    graph, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init() -> nnx.State:
        return nnx.split(make(nnx.Rngs(seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    return graph, state


def gather(tree: Any, mesh: Mesh) -> Any:
    """A host (numpy) copy of a sharded tree on every process. Collective: with several
    processes every one must call it (each holds only its shards)."""
    replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
    return jax.device_get(replicated)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch(global_batch: int, mesh: Mesh) -> None:
    """Fail early when the global batch cannot split over the batch axes."""
    n = batch_divisor(mesh)
    if global_batch % n:
        raise ValueError(
            f"global batch {global_batch} does not divide over the batch axes data x fsdp = "
            f"{n} devices: use a multiple of {n} (e.g. {max(n, global_batch // n * n)})"
        )


def describe(state: nnx.State, mesh: Mesh) -> dict[str, Any]:
    """Bytes per device and what stayed replicated (to read before a large run)."""
    total = per_device = 0
    replicated = []
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        nbytes = value.size * value.dtype.itemsize
        sharding = getattr(value, "sharding", None)
        if sharding is None or isinstance(value, jax.ShapeDtypeStruct):
            sharding = NamedSharding(mesh, spec_for(_logical(var), value.shape, mesh))
        shard = sharding.shard_shape(value.shape)
        total += nbytes
        per_device += math.prod(shard) * value.dtype.itemsize
        if shard == tuple(value.shape) and nbytes >= 1 << 20:
            replicated.append(("/".join(map(str, path)), nbytes))
    return {"bytes": total, "bytes_per_device": per_device, "replicated_over_1mb": replicated}


def tree_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> Any:
    """Shardings for any pytree holding nnx Variables (params, EMA, optax moments built from
    them keep the Variables' metadata) and plain arrays (step counters, keys: replicated)."""
    replicated = NamedSharding(mesh, P())

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            return x.replace(NamedSharding(mesh, spec_for(_logical(x), value.shape, mesh, rules)))
        return replicated

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
