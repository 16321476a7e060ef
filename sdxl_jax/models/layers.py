"""Building blocks shared by the UNet, the VAE and the text encoders.

Every weight carries its logical axis names in the ``logical_axes`` metadata field; the
mapping of logical names to mesh axes lives in one place (``sdxl_jax.sharding``) and is chosen
by the config. Stacked (scanned) layers get a leading ``"layers"`` axis.

Layout conventions: images are NHWC, sequences [B, T, D]; conv kernels HWIO; linear kernels
[in, out]. Parameters are created in ``param_dtype`` (fp32 by default) and computed in
``dtype`` (bf16 for training, fp32 for parity tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

BATCH_MESH_AXES = ("data", "fsdp")  # as sdxl_jax.sharding.BATCH_AXES (no import cycle)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keep an activation split over the batch axes (data, fsdp) of the mesh in context
    (``jax.set_mesh``, as the train step sets it); a no-op without one. Without these hints
    XLA's partitioner may gather the batch to meet fsdp-sharded weights and repeat the work on
    every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


Dtype = Any
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


class _Adapted:
    """An optional low-rank adapter (``lora``, see :mod:`sdxl_jax.models.lora`) whose output is
    added to the layer's: ``y = layer(x) + lora(x)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        return y if self.lora is None else y + self.lora(x).astype(y.dtype)


class Linear(_Adapted, nnx.Linear):
    """``nnx.Linear`` with an optional adapter: ``y = x W + b + lora(x)``."""


class Conv(_Adapted, nnx.Conv):
    """``nnx.Conv`` with an optional adapter (a conv to the rank with this layer's stride and
    padding, then a 1x1 conv), added to the layer's output."""


def linear(
    din: int,
    dout: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
) -> Linear:
    """A :class:`Linear` whose kernel and bias carry logical axis names."""
    return Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
    )


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: Any = "SAME_TORCH",
    use_bias: bool = True,
) -> Conv:
    """An NHWC :class:`Conv`; the default padding is PyTorch's symmetric ``kernel // 2``."""
    if padding == "SAME_TORCH":
        padding = ((kernel // 2, kernel // 2),) * 2
    return Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata={"logical_axes": (None, None, "conv_in", "conv_out")},
        bias_metadata={"logical_axes": ("conv_out",)},
    )


def group_norm(
    channels: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
) -> nnx.GroupNorm:
    """GroupNorm over contiguous channel groups (PyTorch's grouping), two-pass variance."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata={"logical_axes": ("norm",)},
        bias_metadata={"logical_axes": ("norm",)},
    )


def layer_norm(
    dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata={"logical_axes": ("norm",)},
        bias_metadata={"logical_axes": ("norm",)},
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """Multi-head scaled dot-product attention; q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H].

    The single entry point for attention in every model. ``auto`` takes cuDNN's fused kernel on
    GPU where it applies (fp16/bf16, head dim a multiple of 8 up to 128) and XLA elsewhere; a TPU
    splash-attention kernel would slot in here.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(
            f"attention implementation {implementation!r}: use one of {ATTENTION_IMPLS}"
        )
    impl = None if implementation == "auto" else implementation
    if implementation == "auto":
        head = q.shape[-1]
        if (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and head % 8 == 0
            and head <= 128
        ):
            impl = "cudnn"
        else:
            impl = "xla"
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    return checkpoint_name(out, "attention")  # what remat="attention_saveable" keeps


# Remat policies of the scanned stacks by name (``remat=True`` is "nothing_saveable").
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_saveable": jax.checkpoint_policies.save_only_these_names("attention"),
}


def remat_policy(remat: bool | str) -> Any:
    """``remat`` (False / True / a REMAT_POLICIES name) -> None (no remat) or a policy."""
    if remat is False or remat == "" or remat is None:
        return None
    name = "nothing_saveable" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r}: use true, false or one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, T, N*H]."""
    b, t, n, h = x.shape
    return x.reshape(b, t, n * h)


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim], in fp32.

    Matches diffusers' ``get_timestep_embedding`` (SDXL: cos first, shift 0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """Create ``count`` copies of a module with independent init, stacked on a leading axis.

    The result is applied with :func:`scan_apply`, so compile time does not grow with depth.
    Each weight's logical axes gain a leading ``"layers"`` name.
    """
    if count < 1:
        raise ValueError(f"a stack needs at least one layer, got {count}")

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    module = create(rngs)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            axes = var.get_metadata().get("logical_axes")
            if axes is not None:
                var.set_metadata(logical_axes=("layers", *axes))
    return module


def scan_apply(
    stack: nnx.Module,
    x: jax.Array,
    *args: Any,
    remat: bool | str = False,
    collect: bool = False,
    unroll: int | bool = 1,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Run ``x = layer(x, *args)`` over the layers of a :func:`stacked` module under ``nnx.scan``.

    ``args`` (e.g. the cross-attention context) are broadcast to every layer. ``remat``
    recomputes each layer's activations in the backward pass instead of storing them (True: all
    of them; a REMAT_POLICIES name: all but what that policy saves).
    ``collect`` also returns every layer's output stacked, [L, *x.shape]. ``unroll`` is
    ``lax.scan``'s (``True`` unrolls fully: XLA's cost analysis then counts every layer).
    """

    # Plain lax.scan over the split state (not nnx.scan): the stack may be called inside
    # other traced loops (a sampler's fori_loop) whose weights come from an outer trace.
    graph, state = nnx.split(stack)

    def body(h: jax.Array, layer_state: Any) -> tuple[jax.Array, jax.Array | None]:
        h = constrain_batch(nnx.merge(graph, layer_state)(h, *args))
        return h, (h if collect else None)

    if (policy := remat_policy(remat)) is not None:
        body = jax.checkpoint(body, policy=policy)
    h, per_layer = jax.lax.scan(body, x, state, unroll=unroll)
    return (h, per_layer) if collect else h


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv3x3 (+ projected time embedding when ``temb`` is set), GroupNorm-SiLU-
    conv3x3, residual through a 1x1 conv when the width changes. diffusers' ``ResnetBlock2D``;
    the UNet's has a time embedding, the VAE's none."""

    def __init__(
        self,
        cin: int,
        cout: int,
        temb: int | None,
        groups: int,
        eps: float,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = group_norm(cin, groups, eps, **kw)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.time_emb_proj = linear(temb, cout, (None, "conv_out"), **kw) if temb else None
        self.norm2 = group_norm(cout, groups, eps, **kw)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:  # [B, H, W, C]
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return constrain_batch(x + h)


class Downsample2D(nnx.Module):
    """Stride-2 conv3x3. UNet: symmetric padding 1; VAE: ``((0, 1), (0, 1))`` (bottom/right)."""

    def __init__(
        self, ch: int, padding: Any = "SAME_TORCH", *, rngs: nnx.Rngs, dtype: Dtype,
        param_dtype: Dtype,
    ):  # fmt: skip
        self.conv = conv(
            ch, ch, 3, stride=2, padding=padding, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x, then conv3x3."""

    def __init__(self, ch: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        self.conv = conv(ch, ch, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        """``size``: the output height and width when not exactly 2x (odd skip sizes)."""
        h, w = x.shape[1:3]
        if size is None or tuple(size) == (2 * h, 2 * w):
            return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        # PyTorch's "nearest": source index floor(i * in / out).
        rows = (np.arange(size[0]) * h) // size[0]
        cols = (np.arange(size[1]) * w) // size[1]
        return self.conv(x[:, rows][:, :, cols])
