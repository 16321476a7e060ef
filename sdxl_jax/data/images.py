"""Robust image decoding: encoded bytes -> uint8 RGB [H, W, 3], or BadImage with a reason.

Every image mode a web-scraped corpus holds comes out as 8-bit RGB: EXIF orientation applied,
alpha composited on white, CMYK/L/P converted, 16-bit scaled to 8-bit. Files that cannot be
decoded raise ``BadImage`` whose ``reason`` is one of SKIP_REASONS, so ``prepare`` can count and
skip them.

Truncated files are skipped, never padded: PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` must
stay False (its default), and ``decode_rgb`` refuses to run if some other code switched it on,
since PIL would then fill the missing part with grey and call the image fine.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

SKIP_REASONS = ("empty_file", "not_an_image", "truncated", "too_large", "unsupported_mode")

# Decoded-size limit: PIL's own decompression-bomb threshold (~89.5 MP, 268 MB as RGB).
MAX_PIXELS = 89_478_485

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the PIL transpose that displays the stored pixels upright (as ImageOps).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# File signatures: a file that starts like an image but cannot be opened is a truncated or corrupt
# image ("truncated"), not some other kind of file ("not_an_image").
_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImage(ValueError):
    """An undecodable image; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; one of {SKIP_REASONS}")
        super().__init__(reason, message)  # both in args, so it pickles across processes
        self.reason, self.message = reason, message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) or raise BadImage: empty_file, not_an_image, too_large."""
    if len(data) == 0:
        raise BadImage("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            # Bomb warnings are handled by max_pixels; corrupt-EXIF warnings would flood logs.
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as e:
        reason = "truncated" if _looks_like_image(data) else "not_an_image"
        raise BadImage(reason, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImage("not_an_image", f"header says size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return im


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF should not lose an otherwise fine image
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def probe(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header alone (pixels are not decoded).

    Raises BadImage ("empty_file", "not_an_image", "too_large"). A truncated file usually has an
    intact header, so probe passes it; only decode_rgb finds truncation.
    """
    im = _open(data, max_pixels)
    w, h = im.size
    return (w, h) if _orientation(im) in (5, 6, 7, 8) else (h, w)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any decoded PIL image -> uint8 [H, W, 3]."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        v = np.asarray(im).astype(np.int64)  # [H, W]
        if v.min(initial=0) < 0 or v.max(initial=0) > 65535:
            raise BadImage("unsupported_mode", f"mode {mode} values outside 0..65535")
        g = ((v * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)  # [H, W, 4]
        a = rgba[:, :, 3:]
        # Composite on white, rounded: (c * a + 255 * (255 - a)) / 255.
        rgb = (rgba[:, :, :3] * a + 255 * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("L", "1", "P", "CMYK", "YCbCr"):
        # CMYK: PIL's plain conversion; embedded ICC profiles are not applied.
        return np.asarray(im.convert("RGB"))
    raise BadImage("unsupported_mode", f"mode {mode} (e.g. float or LAB) has no RGB conversion")


def decode_rgb(
    data: bytes, *, max_pixels: int = MAX_PIXELS, min_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Encoded bytes -> uint8 [H, W, 3], EXIF orientation applied; the first frame if animated.

    ``min_size`` (h, w), after orientation, lets a JPEG decode at 1/2, 1/4 or 1/8 scale (in the
    DCT, several times faster) while staying at least that large; pass a planned crop's
    ``resized_size`` and ``apply_crop`` gives nearly the pixels of a full decode. Other formats
    ignore it. Without it the full image is decoded.

    Raises BadImage: "empty_file", "not_an_image" (no known image format), "too_large",
    "truncated" (an image signature, but the header or pixel data ends early or is corrupt),
    "unsupported_mode".
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (some imported code set it), so PIL "
            "would pad truncated images with grey instead of failing; set it back to False"
        )
    im = _open(data, max_pixels)
    orientation = _orientation(im)
    if min_size is not None and im.format == "JPEG":
        h, w = min_size
        im.draft(None, (h, w) if orientation in (5, 6, 7, 8) else (w, h))  # PIL wants (w, h)
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage("truncated", f"{type(e).__name__}: {e}") from None
    if orientation != 1:
        im = im.transpose(_TRANSPOSE[orientation])
    out = _to_rgb(im)
    return np.ascontiguousarray(out)
