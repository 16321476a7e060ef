"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG16 variant: the perceptual term of the autoencoder's loss (LDM, SDXL paper 2.4).

``d(x0, x1) = sum_l mean_{h,w} sum_c w_lc (n(f_l(x0)) - n(f_l(x1)))^2`` where ``f_l`` are the
ReLU outputs conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 of VGG16's ``features`` stack, ``n``
divides each pixel's feature vector by its L2 norm, and ``w_l >= 0`` are the learned 1x1 heads.
Inputs are images in [-1, 1], first shifted and scaled by LPIPS' ``ScalingLayer``.

The weights are never random in use: ``load_perceptual`` (in the ``weights`` package, beside the
other checkpoint readers) reads torchvision's VGG16 and the LPIPS heads from a file and hands them
to :func:`lpips_from_arrays`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.models import layers

Dtype = Any
# VGG16 ("D"): conv widths per block; a 2x2 max pool precedes blocks 2..5.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS' ScalingLayer: (x - shift) / scale maps [-1, 1] images to ImageNet-normalised ones.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # LPIPS' normalize_tensor


class LPIPS(nnx.Module):
    """Perceptual distance between two image batches [B, H, W, 3] in [-1, 1] -> [B]."""

    def __init__(
        self, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        convs, cin = [], 3
        for block in VGG16_BLOCKS:
            for cout in block:
                convs.append(layers.conv(cin, cout, 3, **kw))
                cin = cout
        self.features = nnx.List(convs)
        # The heads are 1x1 convs to one channel without bias: a weight per channel.
        self.lins = nnx.List(
            [
                nnx.Param(jnp.full((b[-1],), 1.0 / b[-1], param_dtype), logical_axes=("norm",))
                for b in VGG16_BLOCKS
            ]
        )
        self.dtype = dtype

    def vgg_features(self, x: jax.Array) -> list[jax.Array]:
        """The five ReLU outputs [B, H / 2^l, W / 2^l, C_l] of an ImageNet-normalised image."""
        outs, i = [], 0
        for level, block in enumerate(VGG16_BLOCKS):
            if level:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))  # floors odd sides, as torch does
            for _ in block:
                x = nnx.relu(self.features[i](x))
                i += 1
            outs.append(x)
        return outs

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        b = x0.shape[0]
        x = jnp.concatenate([x0, x1]).astype(jnp.float32)  # one pass for both: [2B, H, W, 3]
        feats = self.vgg_features(((x - shift) / scale).astype(self.dtype))
        total = jnp.zeros((b,), jnp.float32)
        for f, w in zip(feats, self.lins, strict=True):
            n = unit_normalise(f.astype(jnp.float32))
            d = jnp.square(n[:b] - n[b:])  # [B, h, w, C]
            total = total + jnp.mean(d @ w[...].astype(jnp.float32), axis=(1, 2))
        return total


def unit_normalise(f: jax.Array) -> jax.Array:
    """Each pixel's feature vector over its L2 norm (+ eps), fp32."""
    # The 1e-20 inside the root changes no value that matters but keeps the gradient finite at an
    # all-zero feature vector (a dead ReLU pixel), where sqrt's derivative is infinite.
    norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-20)
    return f / (norm + NORM_EPS)


def lpips_from_arrays(
    convs: Sequence[tuple[np.ndarray, np.ndarray]],
    heads: Sequence[np.ndarray],
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    sharding: jax.sharding.Sharding | None = None,
) -> LPIPS:
    """LPIPS with the given weights, each placed with ``sharding`` (default: device 0).

    ``convs``: VGG16's 13 convs in order, each (kernel [3, 3, C_in, C_out], bias [C_out]);
    ``heads``: the five linear heads, each [C_l] (LPIPS clamps them >= 0).
    """
    model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def put(var: nnx.Variable, a: np.ndarray) -> None:
        if tuple(a.shape) != tuple(var.shape):
            raise ValueError(f"LPIPS: got a weight of shape {a.shape}, need {tuple(var.shape)}")
        var.set_value(jax.device_put(np.asarray(a, np.dtype(param_dtype)), sharding))

    for conv, (kernel, bias) in zip(model.features, convs, strict=True):
        put(conv.kernel, kernel)
        put(conv.bias, bias)
    for var, w in zip(model.lins, heads, strict=True):
        put(var, w)
    return model
