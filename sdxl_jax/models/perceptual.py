"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG16 variant: the perceptual term of the autoencoder's loss (LDM, SDXL paper 2.4).

``d(x0, x1) = sum_l mean_{h,w} sum_c w_lc (n(f_l(x0)) - n(f_l(x1)))^2`` where ``f_l`` are the
ReLU outputs conv1_2, conv2_2, conv3_3, conv4_3, conv5_3 of VGG16's ``features`` stack, ``n``
divides each pixel's feature vector by its L2 norm, and ``w_l >= 0`` are the learned 1x1 heads.
Inputs are images in [-1, 1], first shifted and scaled by LPIPS' ``ScalingLayer``.

The weights are never random in use: :func:`load_perceptual` reads one .safetensors file with
torchvision's ``vgg16().features`` keys (``features.N.weight`` / ``.bias``) and the LPIPS heads
(``lin0.model.1.weight`` ... ``lin4.model.1.weight``, each [1, C, 1, 1]). Such a file, in an
environment that has both packages' weights::

    sd = {k: v for k, v in torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict().items()
          if k.startswith("features.")}
    sd |= {k: v for k, v in lpips.LPIPS(net="vgg").state_dict().items() if k.startswith("lin")}
    safetensors.torch.save_file(sd, "lpips_vgg16.safetensors")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.models import layers
from sdxl_jax.weights.safetensors_io import TensorSource

Dtype = Any
# VGG16 ("D"): conv widths per block; a 2x2 max pool precedes blocks 2..5.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Index of each conv in torchvision's vgg16().features (ReLUs and pools take the others).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
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


def expected_keys() -> dict[str, tuple[int, ...]]:
    """Reference key -> PyTorch shape of every tensor :func:`load_perceptual` reads."""
    out: dict[str, tuple[int, ...]] = {}
    cin, j = 3, 0
    for block in VGG16_BLOCKS:
        for cout in block:
            i = VGG16_CONV_INDICES[j]
            out[f"features.{i}.weight"] = (cout, cin, 3, 3)
            out[f"features.{i}.bias"] = (cout,)
            cin, j = cout, j + 1
    for k, block in enumerate(VGG16_BLOCKS):
        out[f"lin{k}.model.1.weight"] = (1, block[-1], 1, 1)
    return out


def load_perceptual(
    path: str | Path,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    sharding: jax.sharding.Sharding | None = None,
) -> LPIPS:
    """LPIPS with VGG16 and head weights from a .safetensors file (see the module docstring).

    Every expected key is checked (presence and shape) before anything is read; a problem
    raises ValueError naming the keys. ``sharding``: where the weights go (default: device 0).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"perceptual weights {path} do not exist: point ae.perceptual_path at a .safetensors "
            f"file with VGG16 features.* and LPIPS lin*.model.1.weight tensors, or set it to '' "
            f"to train without the perceptual term"
        )
    source = TensorSource.open(path)
    want = expected_keys()
    missing = [k for k in want if k not in source]
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} of the {len(want)} LPIPS tensors: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. Expected torchvision "
            f"vgg16().features keys (features.N.weight/bias) and LPIPS heads "
            f"(lin0.model.1.weight ... lin4.model.1.weight); see sdxl_jax.models.perceptual"
        )
    wrong = [f"{k} {source.shape(k)} (want {s})" for k, s in want.items() if source.shape(k) != s]
    if wrong:
        raise ValueError(f"{path}: tensors of the wrong shape: {'; '.join(wrong[:4])}")
    keys = list(want)
    convs = [keys[2 * j : 2 * j + 2] for j in range(len(VGG16_CONV_INDICES))]
    heads = keys[2 * len(VGG16_CONV_INDICES) :]
    model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def put(a: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(a, np.dtype(param_dtype)), sharding)

    for conv, (kw, kb) in zip(model.features, convs, strict=True):
        conv.kernel.set_value(put(source.read(kw).transpose(2, 3, 1, 0)))  # OIHW -> HWIO
        conv.bias.set_value(put(source.read(kb)))
    for k, key in enumerate(heads):
        w = source.read(key).reshape(-1)
        if (w < 0).any():
            raise ValueError(f"{path}: {key} has negative weights; LPIPS heads are clamped >= 0")
        model.lins[k].set_value(put(w))
    return model
