"""Aspect-ratio buckets: the SDXL paper's ~1024^2 table (appendix I), generated analogues at other
sizes, bucket assignment, and the resize-to-cover + crop that SDXL's crop conditioning records.

Assignment: an image goes to the bucket nearest in log aspect ratio, |log(h/w) - log(bh/bw)|,
compared exactly with integers (ties -> the lower bucket index). Cropping: resize to *cover* the
bucket (scale = max(bh/h, bw/w)), then cut a (bh, bw) window, at random or in the centre; the
crop conditioning is that window's (top, left) in the resized image, as OneTrainer and diffusers
record it (kohya's letterbox offsets are a different quantity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

# (height, width), multiples of 64, about 1024^2 pixels; as commonly copied from the paper.
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip


def _closer(h: int, w: int, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """True when bucket a's aspect is strictly nearer (h, w)'s than b's, in |log ratio|.

    |log(h*bw / (w*bh))| is log(max(p, q) / min(p, q)) with p = h*bw, q = w*bh; two such ratios
    compare exactly by cross-multiplying integers, so ties are real ties, not float noise.
    """
    pa, qa = h * a[1], w * a[0]
    pb, qb = h * b[1], w * b[0]
    return max(pa, qa) * min(pb, qb) < max(pb, qb) * min(pa, qa)


@dataclass(frozen=True)
class BucketSet:
    """Named bucket sizes, (height, width) each; the index into ``sizes`` is the bucket id."""

    name: str
    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not self.sizes:
            raise ValueError(f"bucket set {self.name!r} has no sizes")
        for h, w in self.sizes:
            if h <= 0 or w <= 0:
                raise ValueError(f"bucket set {self.name!r}: size {(h, w)} is not positive")

    def __len__(self) -> int:
        return len(self.sizes)

    def nearest(self, height: int, width: int) -> int:
        """Index of the bucket nearest in |log(h/w) - log(bh/bw)|; ties go to the lower index."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size {(height, width)} is not positive")
        best = 0
        for i in range(1, len(self.sizes)):
            if _closer(height, width, self.sizes[i], self.sizes[best]):
                best = i
        return best

    @property
    def aspect_range(self) -> tuple[float, float]:
        """(min h/w, max h/w) over the buckets."""
        ratios = [h / w for h, w in self.sizes]
        return min(ratios), max(ratios)

    def in_range(self, height: int, width: int, tolerance: float = 1.0) -> bool:
        """Whether h/w lies in [min_aspect / tolerance, max_aspect * tolerance].

        With tolerance t >= 1, an image just inside the bound loses at most a fraction 1 - 1/t of
        its (cover-resized) extent to the crop into the most extreme bucket; t = 1 is the set's
        own range. A square-only set has range [1, 1], so it needs a generous tolerance (or a
        caller that accepts cropping) to keep non-square images.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"image size {(height, width)} is not positive")
        if tolerance < 1.0:
            raise ValueError(f"tolerance {tolerance} must be >= 1 (1 = the set's own range)")
        # Exact rationals, so an image with exactly an extreme bucket's aspect is in range.
        ratios = [Fraction(h, w) for h, w in self.sizes]
        a, t = Fraction(height, width), Fraction(tolerance)
        return min(ratios) / t <= a <= max(ratios) * t

    def assign(self, heights, widths, tolerance: float = 1.0) -> np.ndarray:
        """Bucket index per image, -1 where the aspect is out of range: int16 [N]."""
        heights, widths = np.asarray(heights), np.asarray(widths)
        out = np.full(heights.shape, -1, np.int16)
        for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist(), strict=True)):
            if self.in_range(h, w, tolerance):
                out[i] = self.nearest(h, w)
        return out


def generate(
    name: str,
    pixels: int,
    step: int,
    *,
    max_aspect: float = 4.0,
    square_only: bool = False,
    min_fill: float = 0.9,
) -> BucketSet:
    """Buckets of (h, w), multiples of ``step``, with h*w <= ``pixels``, sorted by h/w.

    A size is kept when its aspect is within [1/max_aspect, max_aspect] and either it is the
    largest width for its height, or the largest height for its width (so every grid row and
    column has one, symmetrically), or it fills at least ``min_fill`` of the pixel budget.
    ``square_only`` gives the single largest square.

    How close to the paper: generate("x", 1024**2, 64) is SDXL_BUCKETS plus (1344, 704), the
    one size that the paper's table leaves out of an otherwise symmetric list (41 vs 40); the
    rows alone ("largest w for each h") would give 25 of the 40, biased to tall sizes.
    """
    if pixels < step * step or step <= 0:
        raise ValueError(f"pixels={pixels} must be at least step^2 = {step}^2 (step > 0)")
    if square_only:
        s = math.isqrt(pixels) // step * step
        return BucketSet(name, ((s, s),))
    if max_aspect < 1.0 or not 0.0 < min_fill <= 1.0:
        raise ValueError(f"need max_aspect >= 1 and 0 < min_fill <= 1: {max_aspect}, {min_fill}")
    ok = lambda h, w: 1 / max_aspect <= h / w <= max_aspect
    sizes = set()
    for h in range(step, pixels // step + 1, step):
        w = pixels // h // step * step  # largest width for this height
        if w >= step and ok(h, w):
            sizes.add((h, w))
        if w >= step and ok(w, h):
            sizes.add((w, h))  # transposed: largest height for this width
        for w2 in range(w, 0, -step):
            if w2 * h < min_fill * pixels:
                break
            if ok(h, w2):
                sizes.add((h, w2))
    return BucketSet(name, tuple(sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))))


BUCKET_SETS: dict[str, BucketSet] = {
    "sdxl_1024": BucketSet("sdxl_1024", SDXL_BUCKETS),
    # Steps of 32 pixels: the SDXL UNet halves its latent twice and the VAE divides by 8.
    "sdxl_512": generate("sdxl_512", 512 * 512, 32),
    "sdxl_256": generate("sdxl_256", 256 * 256, 32),
    "square_256": generate("square_256", 256 * 256, 32, square_only=True),
    "square_512": generate("square_512", 512 * 512, 32, square_only=True),
    "square_1024": generate("square_1024", 1024 * 1024, 64, square_only=True),
    # Steps of 16 pixels: the tiny VAE divides by 4 and the tiny UNet halves twice.
    "tiny_32": generate("tiny_32", 32 * 32, 16),
    "tiny_64": generate("tiny_64", 64 * 64, 16),
    # Three aspect buckets (5:3, 1:1, 3:5): multi-aspect training with few compiled shapes.
    "tiny_aspect_64": generate("tiny_aspect_64", 64 * 64, 16, max_aspect=2.0),
    "tiny_square_32": generate("tiny_square_32", 32 * 32, 16, square_only=True),
    "tiny_square_64": generate("tiny_square_64", 64 * 64, 16, square_only=True),
}


def bucket_set(name: str) -> BucketSet:
    """The named preset from BUCKET_SETS."""
    try:
        return BUCKET_SETS[name]
    except KeyError:
        raise ValueError(
            f"unknown bucket set {name!r}; choose one of {sorted(BUCKET_SETS)} or build one "
            "with buckets.generate(name, pixels, step)"
        ) from None


@dataclass(frozen=True)
class Crop:
    """Resize ``original -> resized_size`` then cut ``target_size`` at (top, left), maybe mirror.

    ``top``/``left`` are where the window is cut in the resized image, before any mirroring.
    """

    bucket: int
    target_size: tuple[int, int]
    resized_size: tuple[int, int]
    top: int
    left: int
    flip: bool

    @property
    def crop_coords_top_left(self) -> tuple[int, int]:
        """(top, left) as SDXL's crop conditioning records it: the window in the resized image
        as the model sees it; after a mirror the window's left edge is resized_w - left - w."""
        if self.flip:
            return self.top, self.resized_size[1] - self.left - self.target_size[1]
        return self.top, self.left


def plan_crop(
    original_size: tuple[int, int],
    bucket_size: tuple[int, int],
    *,
    bucket: int = 0,
    rng: np.random.Generator | None = None,
    flip: bool = False,
) -> Crop:
    """Resize to cover the bucket, then a uniformly random window (centre when rng is None)."""
    (h, w), (bh, bw) = original_size, bucket_size
    if min(h, w, bh, bw) <= 0:
        raise ValueError(f"sizes must be positive: original {original_size}, bucket {bucket_size}")
    scale = max(bh / h, bw / w)
    # Round half up; the max() guards float error on the side that should equal the bucket.
    rh, rw = max(bh, math.floor(h * scale + 0.5)), max(bw, math.floor(w * scale + 0.5))
    if rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
    return Crop(int(bucket), (int(bh), int(bw)), (int(rh), int(rw)), top, left, bool(flip))


def apply_crop(
    image: np.ndarray, crop: Crop, *, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [bh, bw, 3]: PIL resize (antialiased), cut, mirror if flip."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    (rh, rw), (bh, bw) = crop.resized_size, crop.target_size
    if image.shape[:2] != (rh, rw):
        image = np.asarray(Image.fromarray(image).resize((rw, rh), resample))
    out = image[crop.top : crop.top + bh, crop.left : crop.left + bw]
    if out.shape[:2] != (bh, bw):
        raise ValueError(f"crop {crop} does not fit the resized image {(rh, rw)}")
    if crop.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
