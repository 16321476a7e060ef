"""LPIPS-VGG16 weights from one .safetensors file (``sdxl_jax.models.perceptual`` is the model).

The file holds torchvision's ``vgg16().features`` keys (``features.N.weight`` / ``.bias``) and the
LPIPS heads (``lin0.model.1.weight`` ... ``lin4.model.1.weight``, each [1, C, 1, 1]). Such a file,
in an environment that has both packages' weights::

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

from sdxl_jax.models.perceptual import LPIPS, VGG16_BLOCKS, lpips_from_arrays
from sdxl_jax.weights.safetensors_io import TensorSource

# Index of each conv in torchvision's vgg16().features (ReLUs and pools take the others).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


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


def _checked_source(path: Path) -> TensorSource:
    """The file, with every expected key present in its expected shape (nothing read yet)."""
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
            f"(lin0.model.1.weight ... lin4.model.1.weight); see sdxl_jax.weights.perceptual"
        )
    wrong = [f"{k} {source.shape(k)} (want {s})" for k, s in want.items() if source.shape(k) != s]
    if wrong:
        raise ValueError(f"{path}: tensors of the wrong shape: {'; '.join(wrong[:4])}")
    return source


def load_perceptual(
    path: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    sharding: jax.sharding.Sharding | None = None,
) -> LPIPS:
    """LPIPS with VGG16 and head weights from a .safetensors file (see the module docstring).

    Every expected key is checked (presence and shape) before anything is read; a problem
    raises ValueError naming the keys. ``sharding``: where the weights go (default: device 0).
    """
    path = Path(path)
    source = _checked_source(path)
    keys = list(expected_keys())
    n_convs = len(VGG16_CONV_INDICES)
    convs = [
        (source.read(keys[2 * j]).transpose(2, 3, 1, 0), source.read(keys[2 * j + 1]))  # -> HWIO
        for j in range(n_convs)
    ]
    heads = []
    for key in keys[2 * n_convs :]:
        w = source.read(key).reshape(-1)
        if (w < 0).any():
            raise ValueError(f"{path}: {key} has negative weights; LPIPS heads are clamped >= 0")
        heads.append(w)
    return lpips_from_arrays(convs, heads, dtype=dtype, param_dtype=param_dtype, sharding=sharding)
