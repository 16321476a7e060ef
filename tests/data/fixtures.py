"""Small helpers shared by the data tests: in-memory stand-in datasets and coded images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_jax.data import buckets as buckets_lib


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def coded_image(height: int, width: int, ident: int) -> np.ndarray:
    """uint8 [H, W, 3]: red = row, green = column, blue = ``ident`` (sides and ident < 256).

    Red and green are linear ramps, which an antialiased resize keeps linear away from the
    borders, so a crop's content tells where in the resized image it was cut (and whether it
    was mirrored); blue survives any resize, so it tells which record an example came from.
    """
    if max(height, width, ident + 1) > 256:
        raise ValueError("coded images need sides and ident below 256")
    rows = np.broadcast_to(np.arange(height)[:, None], (height, width))
    cols = np.broadcast_to(np.arange(width)[None, :], (height, width))
    return np.stack([rows, cols, np.full((height, width), ident)], -1).astype(np.uint8)


def random_sizes(n: int, *, seed: int = 0, low: int = 12, high: int = 120) -> list[tuple[int, int]]:
    """n (height, width) pairs with aspect ratios between 1:4 and 4:1."""
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < n:
        h, w = (int(v) for v in rng.integers(low, high + 1, size=2))
        if 0.25 <= h / w <= 4.0:
            sizes.append((h, w))
    return sizes


def stand_in(
    sizes: list[tuple[int, int]], bucket_sets: tuple[str, ...] = ("tiny_32",)
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(records, side index) shaped like a prepared dataset, held in memory.

    Record i: {"key": "rec00007", "image": PNG of coded_image(h, w, i), "caption": key,
    "height", "width"}; the index carries "key", "height", "width" and "bucket_<set>".
    """
    records = [
        {
            "key": f"rec{i:05d}",
            "image": png_bytes(coded_image(h, w, i)),
            "caption": f"rec{i:05d}",
            "height": h,
            "width": w,
        }
        for i, (h, w) in enumerate(sizes)
    ]
    heights = np.array([h for h, _ in sizes], np.int32)
    widths = np.array([w for _, w in sizes], np.int32)
    index = {"key": np.array([r["key"] for r in records]), "height": heights, "width": widths}
    for name in bucket_sets:
        index["bucket_" + name] = buckets_lib.bucket_set(name).assign(heights, widths)
    return records, index


def prepared_dataset(out: str | Path, n: int = 64, bucket_sets: tuple[str, ...] = ("tiny_32",)):
    """A real prepared dataset (TFDS + side index) of n synthetic shapes under ``out``."""
    from sdxl_jax.data import prepare

    out = Path(out)
    report = prepare.prepare(
        f"synthetic:{n}", out, bucket_sets=bucket_sets, workers=1, progress=False
    )
    return out, report
