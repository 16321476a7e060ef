"""Checking one source record for ``sdxl_jax.data.prepare``: keep it (with its size, captions,
buckets and counted conditions) or skip it with a reason. Runs in prepare's worker processes.

Skip reasons: images.SKIP_REASONS (empty_file, not_an_image, truncated, too_large,
unsupported_mode) and missing_image, read_error, missing_caption, empty_caption,
aspect_out_of_range, too_small; prepare's final write adds duplicate_key and
changed_during_build. Counted on kept records: COUNTED.
"""

from __future__ import annotations

import dataclasses
import io
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdxl_jax.data import buckets, images
from sdxl_jax.data.readers import RawRecord, RecordError, Source

CLIP_MAX_TOKENS = 77  # SDXL's text encoders read BOS + 75 tokens + EOS
DEFAULT_BUCKET_SETS = tuple(buckets.BUCKET_SETS)  # sdxl_1024 first
SKIP_REASONS = images.SKIP_REASONS + (
    "missing_image",
    "read_error",
    "missing_caption",
    "empty_caption",
    "caption_not_utf8",
    "aspect_out_of_range",
    "too_small",
    "duplicate_key",
    "changed_during_build",
)
COUNTED = (
    "small_image",  # smaller than its bucket of the primary set on some side: upscaled later
    "caption_over_77_tokens",
    "aspect_cropped",  # out of the primary set's range, kept by --on-aspect crop
    "converted_to_png",
    "caption_kept_empty",
    "multiple_captions",
)
KEPT_FORMATS = ("jpeg", "png")  # stored as given; everything else becomes PNG
# CLIP's pre-tokenizer (letters, single digits, other runs, English contractions): each piece is
# at least one BPE token, so pieces + BOS + EOS is a lower bound on the token count.
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


@dataclasses.dataclass(frozen=True)
class Options:
    """What decides which records are kept and how they are indexed (a resumed build must use
    the same)."""

    bucket_sets: tuple[str, ...] = DEFAULT_BUCKET_SETS
    on_aspect: str = "skip"
    aspect_tolerance: float = 1.0
    on_empty_caption: str = "skip"
    min_side: int = 0
    verify: str = "decode"
    chunk_size: int = 256

    def __post_init__(self):
        if not self.bucket_sets:
            raise ValueError("--bucket-sets names no set")
        for name in self.bucket_sets:
            buckets.bucket_set(name)  # raises naming the choices
        for flag, value, choices in (
            ("--on-aspect", self.on_aspect, ("skip", "crop")),
            ("--on-empty-caption", self.on_empty_caption, ("skip", "keep")),
            ("--verify", self.verify, ("decode", "probe")),
        ):
            if value not in choices:
                raise ValueError(f"{flag} {value!r}: use one of {choices}")
        if self.aspect_tolerance < 1.0 or self.min_side < 0 or self.chunk_size < 1:
            raise ValueError("need --aspect-tolerance >= 1, --min-side >= 0, --chunk-size >= 1")


def token_counter(tokenizer: str | Path | None) -> tuple[str, Callable[[list[str]], list[int]]]:
    """("exact" | "estimated", captions -> token counts including BOS and EOS)."""
    if tokenizer is None:
        return "estimated", lambda caps: [len(_PIECES.findall(c.lower())) + 2 for c in caps]
    from sdxl_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    return "exact", lambda caps: [len(ids) for ids in tok(caps, truncation=False)["input_ids"]]


def _skip(i: int, key: str, reason: str, detail: str) -> dict[str, Any]:
    return {"i": i, "key": key, "skip": reason, "detail": detail[:300]}


def _format(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return "png" if data.startswith(b"\x89PNG\r\n\x1a\n") else "other"


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _array_png(array: np.ndarray) -> bytes:
    """A TFDS Tensor image (uint8 [H, W, C]) as PNG bytes."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise images.BadImage("unsupported_mode", f"array {array.dtype} {array.shape}")
    return _png(array[:, :, 0] if array.shape[2] == 1 else array)


def _bucket(bset: buckets.BucketSet, h: int, w: int, opts: Options) -> int:
    """Nearest bucket; -1 out of range unless cropping (single-size sets take everything)."""
    if len(bset) == 1 or opts.on_aspect == "crop" or bset.in_range(h, w, opts.aspect_tolerance):
        return bset.nearest(h, w)
    return -1


def _check(i: int, raw: RawRecord, opts: Options) -> dict[str, Any]:
    flags, converted, data = [], None, raw.data
    if isinstance(data, np.ndarray):
        data = converted = _array_png(data)
    h, w = images.probe(data)
    pixels = images.decode_rgb(data) if opts.verify == "decode" else None
    fmt = _format(data)
    if converted is None and fmt not in KEPT_FORMATS:
        pixels = images.decode_rgb(data) if pixels is None else pixels
        converted = _png(pixels)
    if pixels is not None:
        h, w = pixels.shape[:2]  # [H, W, 3], EXIF orientation applied
    if converted is not None:
        flags.append("converted_to_png")

    captions = [c.strip() for c in raw.captions or () if c and c.strip()]
    if not captions:
        reason = "missing_caption" if not raw.captions else "empty_caption"
        if opts.on_empty_caption == "skip":
            return _skip(i, raw.key, reason, "no caption" if not raw.captions else "blank")
        flags.append("caption_kept_empty")
    if len(captions) > 1:
        flags.append("multiple_captions")
    if min(h, w) < opts.min_side:
        return _skip(i, raw.key, "too_small", f"{h}x{w} < --min-side {opts.min_side}")

    sets = [buckets.bucket_set(name) for name in opts.bucket_sets]
    primary, t = sets[0], opts.aspect_tolerance
    if len(primary) > 1 and not primary.in_range(h, w, t):
        if opts.on_aspect == "skip":
            lo, hi = primary.aspect_range
            detail = f"{h}x{w}: h/w {h / w:.3g} outside [{lo / t:.3g}, {hi * t:.3g}]"
            return _skip(i, raw.key, "aspect_out_of_range", detail)
        flags.append("aspect_cropped")
    ids = [_bucket(s, h, w, opts) for s in sets]
    bh, bw = primary.sizes[ids[0]]
    if h < bh or w < bw:
        flags.append("small_image")
    return {
        "i": i,
        "key": raw.key,
        "height": int(h),
        "width": int(w),
        "caption": captions[0] if captions else "",
        "captions": captions,
        "buckets": ids,
        "repeats": int(raw.repeats),
        "loss_weight": float(raw.loss_weight),
        "flags": flags,
        "format": fmt if converted is None else "converted to png",
        "png": converted,  # bytes to store when converted, else None (re-read from the source)
        "size": len(data),
        "crc": zlib.crc32(data),
    }


def check_record(source: Source, i: int, opts: Options) -> dict[str, Any]:
    """Read and check record i -> a kept entry (metadata; PNG bytes only if converted) or a
    skip {"i", "key", "skip": reason, "detail"}. Never raises for a bad record."""
    try:
        raw = source.load(i)
    except RecordError as e:
        return _skip(i, f"#{i}", e.reason, e.detail)
    except Exception as e:  # noqa: BLE001 (a bad record must not stop a build)
        return _skip(i, f"#{i}", "read_error", f"{type(e).__name__}: {e}")
    try:
        return _check(i, raw, opts)
    except images.BadImage as e:
        return _skip(i, raw.key, e.reason, e.message)
    except Exception as e:  # noqa: BLE001
        return _skip(i, raw.key, "read_error", f"{type(e).__name__}: {e}")
