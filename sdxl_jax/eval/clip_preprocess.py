"""transformers' ``CLIPImageProcessor`` in numpy, to the bit, from ``preprocessor_config.json``.

transformers 5's ``CLIPImageProcessor`` (what ``CLIPProcessor`` / ``AutoImageProcessor`` load, so
what torchmetrics' ``CLIPScore`` uses) is its torchvision backend, not PIL: the uint8 image is
resized by ``torchvision.transforms.v2.functional.resize`` (bicubic, antialias), which on the CPU
runs torch's native uint8 kernel (``aten/src/ATen/native/cpu/UpSampleKernel.cpp``): per axis,
Keys' cubic (a = -0.5, as PIL) stretched by the scale when shrinking, weights normalised in
double, then rounded to int16 with a per-axis precision and applied in integer arithmetic; the
width first, rounded to uint8, then the height. PIL's ``Image.resize`` uses 22-bit weights and
differs by one level on ~0.5% of pixels. The shorter edge becomes ``size.shortest_edge`` and the
longer ``int(shortest_edge * long / short)`` (truncated). Then a centre crop (top/left
``int((in - crop) / 2)``, zero padding when the crop is larger) and, in float32, the rescale
folded into the normalisation: ``(x - mean / rescale_factor) / (std / rescale_factor)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's resample code, as preprocessor_config.json spells it


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessing:
    """``CLIPImageProcessor``'s settings; the defaults are its class defaults."""

    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the shorter edge to this ...
    resize_to: tuple[int, int] | None = None  # ... or to exactly (height, width)
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> CLIPImageProcessing:
        """From a ``preprocessor_config.json`` dict; absent (or null) keys take the defaults."""
        d = {k: v for k, v in d.items() if v is not None}
        resample = d.get("resample", BICUBIC)
        if resample != BICUBIC:
            raise ValueError(
                f"preprocessor_config.json resample={resample}: only bicubic (3) is implemented"
            )
        if d.get("do_pad"):
            raise ValueError("preprocessor_config.json do_pad=true is not implemented")
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # as transformers reads a bare number: the shorter edge
            size = {"shortest_edge": size}
        if set(size) == {"shortest_edge"}:
            shortest, resize_to = int(size["shortest_edge"]), None
        elif set(size) == {"height", "width"}:
            shortest, resize_to = None, (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"preprocessor_config.json size={size}: only {{'shortest_edge': N}} or "
                f"{{'height': H, 'width': W}} are implemented"
            )
        crop = d.get("crop_size", {"height": 224, "width": 224})
        crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        base = cls()
        return cls(
            do_resize=bool(d.get("do_resize", base.do_resize)),
            shortest_edge=shortest,
            resize_to=resize_to,
            do_center_crop=bool(d.get("do_center_crop", base.do_center_crop)),
            crop_size=crop,
            do_rescale=bool(d.get("do_rescale", base.do_rescale)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            do_normalize=bool(d.get("do_normalize", base.do_normalize)),
            image_mean=_per_channel(d.get("image_mean", base.image_mean)),
            image_std=_per_channel(d.get("image_std", base.image_std)),
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size once processed."""
        if self.do_resize:
            height, width = self.resized_size(height, width)
        return self.crop_size if self.do_center_crop else (height, width)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        s = self.shortest_edge
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] (or [H, W] grey) -> float32 [h, w, 3], as the processor's output."""
        image = as_rgb(image)
        if self.do_resize:
            image = resize_uint8(image, self.resized_size(*image.shape[:2]))
        if self.do_center_crop:
            image = center_crop(image, self.crop_size)
        x = image.astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        if self.do_rescale and self.do_normalize:
            # Folded as transformers folds them (float32 mean * (1 / factor)): same rounding.
            scale = np.float32(1.0 / self.rescale_factor)
            return (x - mean * scale) / (std * scale)
        if self.do_normalize:
            return (x - mean) / std
        if self.do_rescale:
            return x * np.float32(self.rescale_factor)
        return x


def _per_channel(v: Any) -> tuple[float, ...]:
    v = (float(v),) * 3 if isinstance(v, (int, float)) else tuple(float(x) for x in v)
    if len(v) != 3:
        raise ValueError(f"preprocessor_config.json: need 3 per-channel values, got {v}")
    return v


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]; grey [H, W] repeated to three channels, as the processor converts it."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"CLIP images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(
            f"CLIP images must be uint8 [H, W, 3] (RGB) or [H, W] (grey), got {image.shape}"
        )
    return image


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> [h, w, C] around the centre; zero padding where the crop is larger."""
    ch, cw = size
    h, w = image.shape[:2]
    if ch > h or cw > w:
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        pad = ((top, max(ch - h, 0) - top), (left, max(cw - w, 0) - left), (0, 0))
        image = np.pad(image, pad)
        h, w = image.shape[:2]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return image[top : top + ch, left : left + cw]


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (torch's antialiased bicubic, PIL's)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Taps [n_out, K], int weights [n_out, K] and their precision (bits) for one axis, as
    torch's ``_compute_index_ranges_int16_weights`` (antialias, align_corners=False)."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(n_out) + 0.5)
    # C++ casts truncate toward zero; clipping below at 0 makes that floor where it matters.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in)
    xsize = np.clip(xmax - xmin, 0, taps)
    j = np.arange(taps)[None]
    w = _keys_cubic(((j + xmin[:, None]) - center[:, None] + 0.5) * invscale)
    w = np.where(j < xsize[:, None], w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # summed left to right, as the C++ loop
    w = np.divide(w, total, out=w, where=total != 0.0)
    wt_max = max(float(w.max()), 0.0)
    precision = 22
    for p in range(22):
        if int(0.5 + wt_max * (1 << (p + 1))) >= 1 << 15:
            precision = p
            break
    v = w * (1 << precision)
    iw = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
    idx = np.minimum(xmin[:, None] + j, n_in - 1)  # taps past xsize carry weight 0
    return idx, iw, precision


def _resample_axis(image: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    idx, w, precision = _axis_weights(image.shape[axis], n_out)
    n_in = image.shape[axis]
    # The integer sums as one float64 matmul (BLAS): every product (< 2^31) and partial sum
    # (< 2^53) is an integer float64 holds exactly, so any summation order gives torch's int.
    dense = np.zeros((n_in, n_out))
    np.add.at(dense, (idx, np.arange(n_out)[:, None]), w)
    acc = np.moveaxis(image, axis, -1).astype(np.float64) @ dense
    out = np.floor((acc + (1 << (precision - 1))) / (1 << precision))  # + 0.5, >> precision
    return np.moveaxis(np.clip(out, 0, 255).astype(np.uint8), -1, axis)


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] -> [h, w, C]: torch's antialiased bicubic uint8 resize (torchvision's on
    the CPU): the width first, rounded to uint8, then the height; an unchanged axis is skipped."""
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"resize to {size}: sizes must be positive")
    if image.shape[1] != w:
        image = _resample_axis(image, 1, w)
    if image.shape[0] != h:
        image = _resample_axis(image, 0, h)
    return image
