"""The InceptionV3 behind FID and the Inception Score: TensorFlow's 2015-12-05 ImageNet graph as
pytorch-fid ports it (``fid_inception_v3``: torchvision's Inception3 with ``FIDInceptionA/C/E_1/
E_2`` blocks and a 1008-way classifier).

It differs from torchvision's InceptionV3 where the TF graph does: the average pools inside
Mixed_5b..Mixed_7b leave the zero padding out of the mean (``count_include_pad=False``), the last
block (Mixed_7c) max-pools its pool branch, BatchNorm's epsilon is 0.001, and the classifier has
1008 classes. BatchNorm always uses the running statistics: the network is only ever evaluated.

Attribute names mirror pytorch-fid's module tree (``Mixed_5b.branch1x1.conv``, ``.bn``, ``fc``),
so the weight file's keys follow from the parameter paths (``sdxl_jax.weights.inception``).
Images are NHWC, as everywhere in sdxl_jax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any
RESOLUTION = 299
BN_EPS = 1e-3  # the TF graph's
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "2048": 2048}


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each output pixel's two source pixels and the second one's weight, as torch's
    ``upsample_bilinear2d`` with ``align_corners=False`` picks them: half-pixel centres, source
    coordinates below 0 clamped to 0, the last pixel repeated past the edge."""
    f32 = np.float32  # torch computes the coordinates in float32: so do we, to its rounding
    src = f32(n_in / n_out) * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0))
    i0 = np.minimum(src.astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0.astype(f32)


def fid_resize(x: jax.Array, size: int = RESOLUTION) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C], as pytorch-fid's ``F.interpolate(x, (299, 299),
    mode="bilinear", align_corners=False)``: two taps per output pixel along each axis, whatever
    the scale. Not ``jax.image.resize``, which antialiases when it downsamples unless told not to
    and does a dense [out, in] contraction per axis (a fifth of the network's time from 512 px).
    """
    for axis in (1, 2):
        if x.shape[axis] != size:
            i0, i1, w = _bilinear_taps(x.shape[axis], size)
            shape = [1, 1, 1, 1]
            shape[axis] = size
            w = jnp.asarray(w.reshape(shape), x.dtype)
            x = jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w
    return x


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 0.001) -> ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            cin,
            cout,
            kernel_size=_pair(kernel),
            strides=(stride, stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": (None, None, "conv_in", "conv_out")},
        )
        self.bn = nnx.BatchNorm(
            cout,
            use_running_average=True,
            epsilon=BN_EPS,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata={"logical_axes": ("norm",)},
            bias_metadata={"logical_axes": ("norm",)},
        )

    def affine(self) -> tuple[jax.Array, jax.Array]:
        """BatchNorm with running statistics as y * scale + shift: [C_out] each."""
        bn = self.bn
        scale = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + BN_EPS)
        return scale, bn.bias[...] - bn.mean[...] * scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv_bn_relu([self], x)[0]


def _conv_bn_relu(convs: list[BasicConv2d], x: jax.Array) -> list[jax.Array]:
    """Several BasicConv2d of one input, the outputs in order. 1x1 convs of the same input run as
    one matmul over channels: on XLA:CPU that is ~10% faster for the whole network than one conv
    each (BENCHMARKS.md); the parameters keep pytorch-fid's names and shapes."""
    first = convs[0].conv
    dtype = first.dtype or x.dtype
    if first.kernel_size == (1, 1) and first.strides == (1, 1):
        kernel = jnp.concatenate([c.conv.kernel[...][0, 0] for c in convs], axis=-1)
        y = jnp.einsum("bhwc,cd->bhwd", x, kernel.astype(dtype))  # [B, H, W, sum C_out]
    else:
        y = jnp.concatenate([c.conv(x) for c in convs], axis=-1)
    scale, shift = (jnp.concatenate(a) for a in zip(*(c.affine() for c in convs), strict=True))
    y = nnx.relu(y * scale.astype(dtype) + shift.astype(dtype))
    return jnp.split(y, np.cumsum([c.conv.out_features for c in convs])[:-1].tolist(), axis=-1)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of real pixels under the window, not 9.
    return nnx.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 1) -> jax.Array:
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nnx.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nnx.Module):
    """Mixed_5b/c/d (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs, **kw: Any):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs, **kw)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs, **kw)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        heads = [self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1]
        b1, b5, b3 = _conv_bn_relu(heads, x)
        b5 = self.branch5x5_2(b5)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(b3))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: 35x35 -> 17x17 (strided 3x3, strided double 3x3, max pool)."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs, **kw: Any):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 branches (1x7 then 7x1) and a pool branch."""

    def __init__(self, cin: int, channels_7x7: int, *, rngs: nnx.Rngs, **kw: Any):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs, **kw)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs, **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs, **kw)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs, **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs, **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs, **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs, **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1, b7, d = _conv_bn_relu([self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1], x)
        b7 = self.branch7x7_3(self.branch7x7_2(b7))
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = conv(d)
        d = self.branch7x7dbl_5(d)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, d, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a: 17x17 -> 8x8 (strided 3x3, 7x7 then strided 3x3, max pool)."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs, **kw: Any):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs, **kw)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs, **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs, **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3, b7 = _conv_bn_relu([self.branch3x3_1, self.branch7x7x3_1], x)
        b3 = self.branch3x3_2(b3)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c (8x8): split 1x3 / 3x1 branches. ``pool``: "avg" in Mixed_7b, "max" in
    Mixed_7c (the TF graph's quirk that pytorch-fid's FIDInceptionE_2 reproduces)."""

    def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs, **kw: Any):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs, **kw)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs, **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs, **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs, **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1, b3, d = _conv_bn_relu([self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1], x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        d = self.branch3x3dbl_2(d)
        d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, d, bp], axis=-1)


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3: images [B, H, W, 3] in [0, 1] -> pooled features + logits.

    Returns ``{"64", "192", "768", "2048"}`` (the outputs of the first and second max pool, of
    Mixed_6e and of Mixed_7c, each averaged over space as pytorch-fid's ``get_activations``
    does; "2048" is pool3, FID's feature), ``"logits_unbiased"`` (the classifier without its bias,
    torch-fidelity's input to the Inception Score) and ``"logits"``.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        num_classes: int = 1008,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = nnx.Linear(
            2048,
            num_classes,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": ("embed", "vocab")},
            bias_metadata={"logical_axes": ("vocab",)},
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, resize: bool = True) -> dict[str, jax.Array]:
        """``x``: [B, H, W, 3] in [0, 1]; ``resize``: bilinearly to 299x299 first (pytorch-fid's
        ``resize_input``). Without it the network runs at the given size."""
        if resize:
            x = fid_resize(x.astype(jnp.float32))
        x = (2 * x - 1).astype(self.dtype)  # [0, 1] -> [-1, 1], as the TF graph expects
        out = {}

        def pooled(name: str, h: jax.Array) -> None:
            out[name] = jnp.mean(h.astype(jnp.float32), axis=(1, 2))  # adaptive_avg_pool2d(1)

        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
        x = _max_pool_3x3(x, 2)  # [B, 73, 73, 64]
        pooled("64", x)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 71, 71, 192]
        x = _max_pool_3x3(x, 2)  # [B, 35, 35, 192]
        pooled("192", x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # [B, 17, 17, 768]
        pooled("768", x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 8, 8, 2048]
        pooled("2048", x)
        kernel = self.fc.kernel[...].astype(jnp.float32)  # [2048, classes]
        out["logits_unbiased"] = out["2048"] @ kernel
        out["logits"] = out["logits_unbiased"] + self.fc.bias[...].astype(jnp.float32)
        return out
