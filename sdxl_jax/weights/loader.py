"""Build a module from named tensors, streaming, straight into the target dtype and sharding.

The module is first built abstractly (``nnx.eval_shape``: nothing allocated), every expected key
and shape is checked against the checkpoint's header, and only then are tensors read, one at a
time, converted to our layout, cast and placed: host memory holds the parameters being built plus
the tensor in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sdxl_jax.weights.mapping import NameRules, ParamEntry, param_entries
from sdxl_jax.weights.safetensors_io import TensorSpec

ShardingFn = Callable[[tuple, nnx.Variable], jax.sharding.Sharding]


class Source(Protocol):
    description: str

    def keys(self) -> list[str]: ...
    def __contains__(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def read(self, key: str) -> np.ndarray: ...


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


def check_source(
    entries: list[ParamEntry], source: Source, rules: NameRules, component: str
) -> None:
    """Fail on the first missing, unexpected or wrongly shaped tensor, before reading any data."""
    expected = {}
    for e in entries:
        for k in e.keys:
            expected[k] = e.ref_shape
    missing = [k for k in expected if k not in source]
    for k, shape in expected.items():  # the first offending key, in the model's order
        if k not in source:
            raise CheckpointMismatch(
                f"{component}: {source.description} lacks {k!r} (expected shape {shape}); "
                f"{len(missing)} of {len(expected)} expected tensors are missing. Check that the "
                f"checkpoint holds this component and that its config matches the weights."
            )
        found = tuple(source.shape(k))
        if found != tuple(shape):
            raise CheckpointMismatch(
                f"{component}: {k!r} has shape {found} in {source.description}, expected "
                f"{tuple(shape)}. The checkpoint was made for a different architecture "
                f"(a refiner given as base, or a config.json that does not match its weights?)."
            )
    unexpected = [
        k
        for k in source.keys()
        if k not in expected and not k.endswith(rules.ignore_suffixes or ("\0",))
    ]
    if unexpected:
        raise CheckpointMismatch(
            f"{component}: {source.description} holds {unexpected[0]!r} "
            f"(shape {tuple(source.shape(unexpected[0]))}), which this model has no place for "
            f"({len(unexpected)} such tensors). The checkpoint is for a different architecture "
            f"or config."
        )


class _Prefixed:
    """A source seen with ``prefix`` in front of every key."""

    def __init__(self, source: Source, prefix: str):
        self.source, self.prefix = source, prefix
        self.description = source.description

    def _strip(self, key: str) -> str | None:
        return key[len(self.prefix) :] if key.startswith(self.prefix) else None

    def keys(self) -> list[str]:
        return [self.prefix + k for k in self.source.keys()]

    def __contains__(self, key: str) -> bool:
        k = self._strip(key)
        return k is not None and k in self.source

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self._strip(key))

    def read(self, key: str) -> np.ndarray:
        return self.source.read(self._strip(key))


def with_optional_prefix(source: Source, rules: NameRules) -> Source:
    """``source`` itself, or seen with ``rules.optional_prefix`` if none of its keys has it."""
    p = rules.optional_prefix
    if not p or any(k.startswith(p) for k in source.keys()):
        return source
    return _Prefixed(source, p)


def default_sharding(path: tuple, var: nnx.Variable) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _read_float(source: Source, key: str, component: str) -> np.ndarray:
    """A parameter's tensor, refused if not floating point (a cast would silently change it)."""
    arr = source.read(key)
    if arr.dtype.kind in "biuc":  # bool, ints, complex; ml_dtypes' floats are kind "V"
        raise CheckpointMismatch(
            f"{component}: {key!r} is {arr.dtype} in {source.description}: a parameter must be "
            f"floating point (a checkpoint of another kind, or a damaged one?)"
        )
    return arr


def load_module(
    abstract: nnx.Module,
    source: Source,
    rules: NameRules,
    *,
    component: str,
    sharding: ShardingFn | None = None,
    progress: bool = False,
) -> nnx.Module:
    """Fill an abstract module (from ``nnx.eval_shape``) with tensors from ``source``.

    Each parameter is created in the dtype the abstract module declares (its ``param_dtype``) and
    placed with ``sharding(path, var)`` (one device by default), one shard at a time.
    ``progress`` shows a bar (bytes, rate, ETA) on stderr.
    """
    sharding = sharding or default_sharding
    source = with_optional_prefix(source, rules)
    entries = param_entries(abstract, rules)
    check_source(entries, source, rules, component)
    graphdef, state = nnx.split(abstract)
    by_path = {e.path: e for e in entries}
    flat = []
    total = sum(int(np.prod(e.shape, dtype=np.int64)) * np.dtype(e.dtype).itemsize for e in entries)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=f"loading {component}", disable=not progress
    )
    for path, var in nnx.to_flat_state(state):
        e = by_path.get(tuple(path))
        if e is None:  # a non-parameter variable: keep as created
            flat.append((path, var))
            continue
        dtype = np.dtype(var.dtype)
        if e.stacked:
            arr = np.empty(e.shape, dtype)
            for i, k in enumerate(e.keys):
                arr[i] = e.to_ours(_read_float(source, k, component))
        else:
            arr = e.to_ours(_read_float(source, e.keys[0], component))
            arr = np.asarray(arr).astype(dtype, copy=False)
        value = jax.make_array_from_callback(
            arr.shape, sharding(path, var), lambda idx, a=arr: a[idx]
        )
        bar.update(arr.nbytes)
        del arr
        flat.append((path, var.replace(value)))
    bar.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_tensors(
    module: nnx.Module, rules: NameRules, dtype: np.dtype | None = None
) -> dict[str, TensorSpec]:
    """Our parameters as reference-named tensors, each converted only when it is written.

    A stacked parameter is fetched to the host once for all its layers (tensors are written in
    order, so a one-entry cache suffices), not once per layer.
    """
    out: dict[str, TensorSpec] = {}
    params = dict(nnx.to_flat_state(nnx.state(module, nnx.Any(*rules.variables))))
    host: dict[tuple, np.ndarray] = {}

    def fetch(e: ParamEntry) -> np.ndarray:
        if e.path not in host:
            host.clear()
            host[e.path] = np.asarray(params[e.path].get_value())
        return host[e.path]

    for e in param_entries(module, rules):
        dt = np.dtype(dtype or params[e.path].dtype)
        for i, k in enumerate(e.keys):

            def produce(e=e, i=i, dt=dt) -> np.ndarray:
                v = fetch(e)
                v = v[i] if e.stacked else v
                return np.ascontiguousarray(e.to_ref(v)).astype(dt, copy=False)

            out[k] = TensorSpec(e.ref_shape, dt, produce)
    return out
