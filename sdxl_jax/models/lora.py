"""Low-rank adapters (LoRA, Hu et al. 2021; conv LoRA as LyCORIS' LoCon) on our models.

Two uses, one representation:

- **Training**: :func:`attach` gives each targeted :class:`~sdxl_jax.models.layers.Linear` /
  :class:`~sdxl_jax.models.layers.Conv` a :class:`LoRA` module whose ``down`` / ``up`` weights are
  ``nnx.LoRAParam`` (flax's parameter type for adapters, a subclass of ``nnx.Param``); the layer
  adds ``scale * up(down(x))`` to its output, computed from the activations as PEFT and kohya do
  (the frozen base is never rewritten, so a small update is not lost to bf16 rounding). A layer
  inside a scanned stack gets adapters stacked along ``layers`` like its kernel.
- **Files and sampling**: an :data:`Adapters` dict, one :class:`Adapter` per (module path, layer
  index) in our layouts, is what the file readers and writers (:mod:`sdxl_jax.weights.lora_files`)
  exchange; :func:`merge` bakes it into a model's kernels (``W += scale * alpha / r * down @ up``).

Layouts (ours): a linear adapter's ``down`` is [in, r] and ``up`` [r, out] (the kernel is
[in, out]); a conv adapter's ``down`` is an HWIO kernel [kh, kw, in, r] and ``up`` [r, out] (a
1x1 conv). The module paths are those of ``nnx.iter_graph`` (e.g. ``('down_blocks', 1,
'attentions', 0, 'transformer_blocks', 'attn1', 'to_q')``); ``layer`` is the index inside a
scanned stack, None outside one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.models.layers import Conv, Linear

Path = tuple  # a module path as nnx.iter_graph gives it
Target = tuple[Path, int | None]  # (module path, layer index inside a scanned stack)


def _leaf(path: Path, *names: str) -> bool:
    return bool(path) and path[-1] in names


# The layer groups a LoRA can cover, by module path. ``attn``: the UNet's attention projections
# (attn1 self, attn2 cross) and the text encoders' self-attention; ``ff`` the UNet's
# feed-forward, ``proj`` the transformers' proj_in / proj_out, ``conv`` the ResNet blocks' and
# resamplers' convolutions (LoCon); ``mlp`` the text encoders' MLP.
GROUPS: dict[str, Callable[[Path, nnx.Module], bool]] = {
    "attn": lambda p, m: (
        len(p) >= 2
        and (
            (p[-2] in ("attn1", "attn2") and _leaf(p, "to_q", "to_k", "to_v", "to_out"))
            or (p[-2] == "self_attn" and _leaf(p, "q_proj", "k_proj", "v_proj", "out_proj"))
        )
    ),
    "ff": lambda p, m: len(p) >= 2 and p[-2] == "ff" and _leaf(p, "proj", "out"),
    "proj": lambda p, m: _leaf(p, "proj_in", "proj_out") and isinstance(m, Linear),
    "conv": lambda p, m: (
        isinstance(m, Conv) and any(s in p for s in ("resnets", "downsamplers", "upsamplers"))
    ),
    "mlp": lambda p, m: len(p) >= 2 and p[-2] == "mlp" and _leaf(p, "fc1", "fc2"),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how large.

    ``alpha`` None means ``alpha = rank`` (a scale of 1, diffusers' training scripts' choice;
    kohya's default is ``alpha = 1``). ``dropout`` drops adapter inputs in training (PEFT's
    ``lora_dropout``); it needs a ``dropout_key`` set per step (see :func:`set_dropout_key`).
    """

    rank: int = 4
    alpha: float | None = None
    groups: tuple[str, ...] = ("attn",)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown LoRA layer group(s) {unknown}: use some of {list(GROUPS)}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


class DropoutKey(nnx.Variable):
    """The PRNG key an adapter's dropout draws from (raw uint32 key data), set per step."""


class LoRA(nnx.Module):
    """The adapter of one layer (or of a scanned stack of layers): ``scale * up(down(x))``.

    ``down`` is initialised as PyTorch's ``kaiming_uniform_(a=sqrt(5))`` (kohya and PEFT:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), ``up`` as zeros, so a fresh adapter changes nothing.
    """

    def __init__(
        self,
        base: Linear | Conv,
        rank: int,
        scale: float,
        *,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
    ):
        kernel = base.kernel.get_value()
        conv = isinstance(base, Conv)
        per_layer = 4 if conv else 2
        lead = tuple(kernel.shape[: kernel.ndim - per_layer])  # (L,) in a stack, () outside
        *window, din, dout = kernel.shape[len(lead) :]
        if rank > min(din, dout):
            raise ValueError(
                f"LoRA rank {rank} is larger than the layer's width (in {din}, out {dout})"
            )
        fan_in = din * math.prod(window)
        bound = 1.0 / math.sqrt(fan_in)
        down_shape = (*lead, *window, din, rank)
        stack_axes = ("layers",) if lead else ()
        self.down = nnx.LoRAParam(
            jax.random.uniform(rngs.params(), down_shape, param_dtype, -bound, bound),
            logical_axes=(*stack_axes, *([None] * (len(window) + 2))),
        )
        self.up = nnx.LoRAParam(
            jnp.zeros((*lead, rank, dout), param_dtype), logical_axes=(*stack_axes, None, None)
        )
        self.scale = float(scale)
        self.rank = rank
        self.dtype = base.dtype
        self.dropout = float(dropout)
        self.dropout_key = DropoutKey(jnp.zeros((*lead, 2), jnp.uint32)) if dropout else None
        self.dropout_active = False  # set_dropout_key turns it on (training); never in sampling
        self.conv = (tuple(base.strides), base.padding) if conv else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        down = self.down.get_value().astype(dtype)
        up = self.up.get_value().astype(dtype)
        x = x.astype(dtype)
        if self.dropout_key is not None and self.dropout and self.dropout_active:
            key = jax.random.wrap_key_data(self.dropout_key.get_value())
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), dtype))
        if self.conv is None:
            h = x @ down
        else:
            strides, padding = self.conv
            h = jax.lax.conv_general_dilated(
                x, down, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return (h @ up) * jnp.asarray(self.scale, dtype)


def find_targets(model: nnx.Module, groups: Iterable[str]) -> list[tuple[Path, Linear | Conv]]:
    """The layers of ``model`` the ``groups`` cover, in graph order."""
    groups = tuple(groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown LoRA layer group(s) {unknown}: use some of {list(GROUPS)}")
    return [
        (tuple(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, (Linear, Conv)) and any(GROUPS[g](tuple(path), node) for g in groups)
    ]


def attach(model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs) -> list[Path]:
    """Give every layer the config's groups cover a fresh adapter (in place); their paths.

    Works on concrete and abstract (``nnx.eval_shape``) models. Raises if no layer matches or a
    rank exceeds a layer's width (naming the layer).
    """
    found = find_targets(model, config.groups)
    if not found:
        raise ValueError(
            f"no layer of {type(model).__name__} is in the LoRA groups {list(config.groups)}"
        )
    for path, layer in found:
        if layer.lora is not None:
            raise ValueError(f"{'.'.join(map(str, path))} already has an adapter")
        try:
            layer.lora = LoRA(layer, config.rank, config.scale, dropout=config.dropout, rngs=rngs)
        except ValueError as e:
            raise ValueError(f"{'.'.join(map(str, path))}: {e}") from None
    return [p for p, _ in found]


def has_adapters(model: nnx.Module) -> bool:
    return any(isinstance(n, LoRA) for _, n in nnx.iter_graph(model))


def set_dropout_key(model: nnx.Module, key: jax.Array) -> None:
    """Give every adapter with dropout its own key for this step (folded from ``key``)."""
    i = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRA) and node.dropout_key is not None:
            shape = node.dropout_key.get_value().shape
            keys = jax.random.split(jax.random.fold_in(key, i), math.prod(shape[:-1]) or 1)
            node.dropout_key.set_value(jax.random.key_data(keys).reshape(shape))
            node.dropout_active = True
            i += 1


# -- adapters as data ----------------------------------------------------------------------


@dataclasses.dataclass
class Adapter:
    """One layer's adapter in our layouts (module docstring); arrays numpy or jax."""

    down: Any  # [in, r] or [kh, kw, in, r]
    up: Any  # [r, out]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.up.shape[0])

    def kernel_shape(self) -> tuple[int, ...]:
        return (*self.down.shape[:-1], self.up.shape[-1])

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """``scale * alpha / rank * down @ up`` in the kernel's layout, float32."""
        down = np.asarray(self.down, np.float32)
        up = np.asarray(self.up, np.float32)
        return (scale * self.alpha / self.rank) * np.tensordot(down, up, axes=([-1], [0]))


Adapters = dict[Target, Adapter]


def adapters_of(model: nnx.Module) -> Adapters:
    """The adapters attached to ``model`` as data (numpy float32), one per layer of a stack."""
    out: Adapters = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (Linear, Conv)) or node.lora is None:
            continue
        lora: LoRA = node.lora
        down = np.asarray(jax.device_get(lora.down.get_value()), np.float32)
        up = np.asarray(jax.device_get(lora.up.get_value()), np.float32)
        alpha = lora.scale * lora.rank
        if up.ndim == 3:  # a scanned stack
            for layer in range(up.shape[0]):
                out[(tuple(path), layer)] = Adapter(down[layer], up[layer], alpha)
        else:
            out[(tuple(path), None)] = Adapter(down, up, alpha)
    return out


def _module_at(model: nnx.Module, path: Path) -> Any:
    node = model
    for seg in path:
        node = node[seg] if isinstance(seg, int) else getattr(node, seg)
    return node


def describe(target: Target) -> str:
    path, layer = target
    return ".".join(map(str, path)) + ("" if layer is None else f"[layer {layer}]")


def check_shapes(model: nnx.Module, adapters: Adapters) -> None:
    """Raise naming the first adapter that does not fit ``model`` (missing layer or shapes)."""
    for target, adapter in adapters.items():
        path, layer = target
        try:
            node = _module_at(model, path)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(f"LoRA: the model has no layer {describe(target)}") from None
        if not isinstance(node, (Linear, Conv)):
            raise ValueError(f"LoRA: {describe(target)} is not a linear or conv layer")
        shape = tuple(node.kernel.get_value().shape)
        stacked = len(shape) == (5 if isinstance(node, Conv) else 3)
        if stacked != (layer is not None) or (stacked and not 0 <= layer < shape[0]):
            raise ValueError(f"LoRA: the model has no layer {describe(target)}")
        want = shape[1:] if stacked else shape
        got = adapter.kernel_shape()
        if tuple(got) != tuple(want):
            raise ValueError(
                f"LoRA: {describe(target)} is {list(want)} in the model but {list(got)} in the "
                f"LoRA (down {list(adapter.down.shape)}, up {list(adapter.up.shape)}): a LoRA "
                "for another architecture?"
            )


def merge(model: nnx.Module, adapters: Adapters, scale: float = 1.0) -> None:
    """Add each adapter's ``scale * alpha / r * down @ up`` to its layer's kernel, in place, in
    float32, kept in the kernel's dtype and sharding. Checks every shape first."""
    check_shapes(model, adapters)
    for target, adapter in adapters.items():
        path, layer = target
        var = _module_at(model, path).kernel
        kernel = var.get_value()
        delta = jnp.asarray(adapter.delta(scale))
        if layer is None:
            new = kernel.astype(jnp.float32) + delta
        else:
            new = kernel.astype(jnp.float32).at[layer].add(delta)
        var.set_value(new.astype(kernel.dtype))


def merge_all(pairs: Sequence[tuple[nnx.Module, Adapters, float]]) -> None:
    """:func:`merge` several (model, adapters, scale), all checked before any is applied."""
    for model, adapters, _ in pairs:
        check_shapes(model, adapters)
    for model, adapters, scale in pairs:
        merge(model, adapters, scale)
