"""Embedded synthetic dataset: one coloured shape at a named position, with an exact scorer.

Each image shows one large, saturated shape (6 colours x 3 shapes x 4 positions = 72 captions,
"a red circle in the top left") on a muted background (grey with a faint tint and a gentle
luminance gradient), in varied sizes (short side 24..160 px) and aspects (1:2 .. 2:1). Nothing is
downloaded; ``examples(n, seed)`` is a pure function of (index, seed). A tiny diffusion model can
learn it on a CPU in minutes, and ``score`` measures what it learned without a pretrained network.

Colour model. A pixel's chroma is its projection on the opponent plane, a = R - (G + B) / 2,
b = sqrt(3) / 2 * (G - B) (the hexagonal hue plane); greys sit at the origin. Backgrounds keep
chroma <= 14 and shape colours >= 140, 45+ degrees of hue apart, so a blur between a shape and its
background is a straight segment in this plane: its hue is the shape's (up to the faint tint)
and its length is the shape's coverage. That is what makes the scorer exact on blurred edges.

Placement rule (what survives a bucket's resize-to-cover + crop). The shape's box is a d x d
square, d = s * min(H, W), s in [0.26, 0.32]; triangles point up. On each axis of length A the
shape's centre of mass sits at c * A from the near edge (left/top, or mirrored), with
c = min(e + outer / A, 0.48 - inner / A, 0.32), e in [0.22, 0.26]; outer / inner are its extents
from the centre of mass toward the edge / the middle (d/2, or 2d/3 above and d/3 below for the
triangle). So the shape stays in its quadrant, its centre of mass at most 0.32 A from the edge
and its outer edge near 0.22..0.26 A. Hence (measured in tests/data/test_synthetic.py):
- a centred crop keeps the middle lines, so it never moves the shape to another quadrant, and
  keeps >= 70% of it for any bucket set (even a 2:1 image cut to a square);
- a crop at any offset that removes at most 30% of one side keeps the centre of mass in its
  quadrant (0.32 / 0.7 < 0.5 - the scorer's 2% dead zone); the crop to the nearest bucket of a set
  whose neighbouring aspects are at most ~1.8x apart (tiny_64, the sdxl_* sets) removes <= 25%
  and keeps >= 70% of the shape (99% on average) at any offset;
- a random crop removing more (a 2:1 image into a square bucket, or a set with wide gaps
  between aspects, such as 1:3 / 1:1 / 3:1 only) can move the shape across the middle or cut it
  off: use centred crops there, or ``max_aspect`` <= 1.4;
- a horizontal flip swaps left and right: do not flip this dataset.

Scorer (``classify`` / ``score``; deterministic, no network):
1. Colour. Chroma is measured from the background's (the median of the pixels with chroma < 40).
   Pixels 40 or more away take the nearest palette hue; the colour is that of the largest
   4-connected single-hue blob covering 0.8%..60% of the image and >= 30% of its bounding box;
   None if there is none (pure background, noise, a flat colour).
2. Coverage alpha: chroma projected on that hue over its 90th percentile in the blob (a darker
   or paler shape still counts as full), soft-thresholded (0.2 -> 0, 0.8 -> 1, 0.5 fixed) near
   the blob; this is exact for renders, as a blur between shape and background is a straight
   segment in the chroma plane.
3. Position: the quadrant of alpha's centroid; None within 2% of a middle line.
4. Shape: a box from alpha's column / row maxima (sum = extent, centroid = middle), the side cut
   by an image border restored from the other (boxes are square); for each of circle, square,
   triangle and each template blur in BLURS the box is refined so the template's centroid and
   spread match alpha's; the shape with the best soft IoU wins, None below 0.4.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),  # hue 0 deg, chroma 180
    "yellow": (230, 200, 30),  # 52 deg, 187
    "green": (30, 180, 50),  # 127 deg, 141
    "cyan": (30, 190, 210),  # 186 deg, 171
    "blue": (40, 70, 220),  # 231 deg, 167
    "purple": (170, 50, 210),  # 286 deg, 145
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")

MAX_ASPECT = 2.0  # default long/short side ratio of examples(); the placement rule assumes <= 2.5
SIZE_RANGE = (0.26, 0.32)  # shape box side / short image side
EDGE_RANGE = (0.22, 0.26)  # outer edge of the shape / axis length (before the caps below)
CENTRE_MAX = 0.32  # centre of mass at most this fraction of the axis from the near edge
QUADRANT_GAP = 0.02  # the shape ends at least this fraction of the axis before the middle

CHROMA_GATE = 40.0  # chroma (0..~190) separating shape pixels from the background family
MIN_AREA = 0.008  # a shape covers at least this fraction of the image (and 6 px)
MAX_AREA = 0.6  # and at most this: a figure needs a background
MIN_SOLIDITY = 0.3  # and at least this fraction of its bounding box
DEAD_ZONE = 0.02  # centroid within this fraction of a middle line -> position None
MIN_IOU = 0.4  # best template IoU below this -> shape None
ALPHA_FLOOR = 0.2  # coverage below this is noise (symmetric soft threshold, 0.5 stays 0.5)
BLURS = (0.0, 0.6, 1.2, 1.8)  # px; templates are matched at each, as model output is often soft

_CAPTION = re.compile(
    r"^\s*an?\s+(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)\s+in\s+the\s+"
    r"(?P<vert>top|bottom)\s+(?P<horiz>left|right)\s*\.?\s*$",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------------- captions


def caption_for(colour: str, shape: str, position: str) -> str:
    """("red", "circle", "top left") -> "a red circle in the top left"."""
    _check(colour, shape, position)
    return f"a {colour} {shape} in the {position}"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Inverse of ``caption_for`` (case, "an", spacing and a final period are forgiven)."""
    m = _CAPTION.match(caption)
    if m is None:
        raise ValueError(
            f"caption {caption!r} is not of the form 'a <colour> <shape> in the "
            "<top|bottom> <left|right>'"
        )
    colour, shape = m["colour"].lower(), m["shape"].lower()
    position = f"{m['vert'].lower()} {m['horiz'].lower()}"
    _check(colour, shape, position)
    return colour, shape, position


def chance_levels() -> dict[str, float]:
    """Accuracy of uniform guessing: {"colour": 1/6, "shape": 1/3, "position": 1/4, "all": 1/72}."""
    c, s, p = 1 / len(COLOURS), 1 / len(SHAPES), 1 / len(POSITIONS)
    return {"colour": c, "shape": s, "position": p, "all": c * s * p}


def _check(colour: str, shape: str, position: str) -> None:
    for value, allowed, what in (
        (colour, tuple(COLOURS), "colour"),
        (shape, SHAPES, "shape"),
        (position, POSITIONS, "position"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; use one of {allowed}")


# ----------------------------------------------------------------------------- rendering


def coverage(
    shape: str,
    box: tuple[float, float, float, float],
    height: int,
    width: int,
    *,
    supersample: int = 4,
) -> np.ndarray:
    """Fraction of each pixel inside ``shape`` filling box = (x0, y0, w, h): float32 [H, W].

    Pixel (i, j) spans [j, j + 1] x [i, i + 1]; the fraction is estimated on a supersample^2 grid.
    The triangle is upright: apex at the middle of the box's top, base along its bottom.
    """
    x0, y0, bw, bh = box
    out = np.zeros((height, width), np.float32)
    # Only the pixels the box touches need sampling.
    r0, r1 = max(0, math.floor(y0)), min(height, math.ceil(y0 + bh))
    c0, c1 = max(0, math.floor(x0)), min(width, math.ceil(x0 + bw))
    if r0 >= r1 or c0 >= c1 or bw <= 0 or bh <= 0:
        return out
    ss = supersample
    offs = (np.arange(ss) + 0.5) / ss
    ys = (np.arange(r0, r1)[:, None] + offs[None, :]).reshape(-1)[:, None]  # [h*ss, 1]
    xs = (np.arange(c0, c1)[:, None] + offs[None, :]).reshape(-1)[None, :]  # [1, w*ss]
    u, v = (xs - x0) / bw, (ys - y0) / bh  # box coordinates, inside = [0, 1]^2
    if shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    elif shape == "triangle":
        inside = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= 0.5 * v)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    out[r0:r1, c0:c1] = inside.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3))
    return out


def _extents(shape: str) -> tuple[float, float, float, float]:
    """(up, down, left, right) from the shape's centre of mass to its box edges, in box sides."""
    if shape == "triangle":  # centre of mass at 2/3 of the height below the apex
        return 2 / 3, 1 / 3, 0.5, 0.5
    return 0.5, 0.5, 0.5, 0.5


def _centre(outer: float, inner: float, edge: float) -> float:
    """Centre of mass as a fraction of the axis from the near edge (the module docstring's c)."""
    return min(edge + outer, 0.5 - QUADRANT_GAP - inner, CENTRE_MAX)


def shape_box(
    shape: str,
    position: str,
    height: int,
    width: int,
    *,
    size: float = 0.29,
    edge: tuple[float, float] = (0.24, 0.24),
) -> tuple[float, float, float, float]:
    """The placement rule: the shape's box (x0, y0, d, d) for relative size and outer edges.

    ``size`` is the box side over min(H, W); ``edge`` the (vertical, horizontal) target outer
    edge fractions e of the module docstring.
    """
    _check("red", shape, position)
    d = size * min(height, width)
    up, down, left, right = (t * d for t in _extents(shape))
    vert, horiz = position.split()
    if vert == "top":
        cy = _centre(up / height, down / height, edge[0]) * height
    else:
        cy = (1 - _centre(down / height, up / height, edge[0])) * height
    if horiz == "left":
        cx = _centre(left / width, right / width, edge[1]) * width
    else:
        cx = (1 - _centre(right / width, left / width, edge[1])) * width
    return cx - left, cy - up, d, d


def random_background(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """(grey RGB float [3], tint RGB float [3] with chroma <= 14, gradient angle in radians)."""
    grey = rng.uniform(45.0, 185.0)
    hue, chroma = rng.uniform(0.0, 2 * math.pi), rng.uniform(0.0, 14.0)
    # Inverse of the opponent transform for a zero-mean tint: a = 1.5 r, b = sqrt(3)/2 (g - b).
    a, b = chroma * math.cos(hue), chroma * math.sin(hue)
    tint = np.array([2 * a / 3, -a / 3 + b / math.sqrt(3), -a / 3 - b / math.sqrt(3)])
    return np.full(3, grey), tint, float(rng.uniform(0.0, 2 * math.pi))


def render(
    colour: str,
    shape: str,
    position: str,
    height: int,
    width: int,
    *,
    background: tuple[int, int, int] | None = None,
    rng: np.random.Generator | None = None,
    edge_range: tuple[float, float] = EDGE_RANGE,
) -> np.ndarray:
    """uint8 [H, W, 3]: one antialiased shape on a background.

    ``background``: a flat RGB colour (keep it low-chroma, i.e. greyish, or the scorer will not
    tell it from a shape), or None for a random muted one (grey 45..185, tint chroma <= 14,
    luminance gradient +-10) drawn from ``rng``. ``rng`` also draws the size and placement jitter;
    with rng None everything is the middle of its range and the background flat grey 110.
    ``edge_range``: where the shape's outer edge may sit, as a fraction of each axis from its
    near border (lower values put shapes nearer the borders; see the placement rule).
    """
    _check(colour, shape, position)
    if min(height, width) < 8:
        raise ValueError(f"image size {(height, width)} is too small; use sides of at least 8 px")
    lo, hi = edge_range
    if not 0.0 <= lo <= hi <= 0.3:
        raise ValueError(f"edge range {edge_range}: need 0 <= lo <= hi <= 0.3 (axis fractions)")
    if rng is None:
        size, edge = sum(SIZE_RANGE) / 2, ((lo + hi) / 2,) * 2
    else:
        size = rng.uniform(*SIZE_RANGE)
        edge = (rng.uniform(lo, hi), rng.uniform(lo, hi))
    if background is not None:
        bg = np.broadcast_to(np.asarray(background, np.float32), (height, width, 3))
    elif rng is None:
        bg = np.full((height, width, 3), 110.0, np.float32)
    else:
        grey, tint, angle = random_background(rng)
        yy, xx = np.mgrid[0:height, 0:width]
        ramp = (math.cos(angle) * (xx / width - 0.5) + math.sin(angle) * (yy / height - 0.5)) * 20
        bg = (grey + tint)[None, None, :] + ramp[..., None]  # [H, W, 3]
    cov = coverage(
        shape, shape_box(shape, position, height, width, size=size, edge=edge), height, width
    )[..., None]
    out = bg * (1 - cov) + np.asarray(COLOURS[colour], np.float32) * cov
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- dataset


def _combination(index: int, seed: int, colours: Sequence[str] = ()) -> tuple[str, str, str]:
    """Every consecutive block of 72 indices holds each (colour, shape, position) once (of
    ``colours`` only, when given: blocks of 12 per colour)."""
    combos = [(c, s, p) for c in colours or COLOURS for s in SHAPES for p in POSITIONS]
    block, offset = divmod(index, len(combos))
    order = np.random.default_rng((seed, 0, block)).permutation(len(combos))
    return combos[order[offset]]


def _size(
    rng: np.random.Generator,
    min_side: int,
    max_side: int,
    max_aspect: float,
    square_fraction: float,
) -> tuple[int, int]:
    short = int(math.exp(rng.uniform(math.log(min_side), math.log(max_side + 1))))
    aspect = (
        1.0 if rng.random() < square_fraction else math.exp(rng.uniform(0, math.log(max_aspect)))
    )
    long = min(round(short * aspect), math.floor(short * max_aspect))
    return (long, short) if rng.random() < 0.5 else (short, long)


def example(
    index: int,
    seed: int = 0,
    *,
    min_side: int = 24,
    max_side: int = 160,
    max_aspect: float = MAX_ASPECT,
    square_fraction: float = 0.2,
    colours: Sequence[str] = (),
    word: str | None = None,
    edge_range: tuple[float, float] = EDGE_RANGE,
) -> dict:
    """Example ``index`` of ``examples``: a pure function of (index, seed) and the options.

    ``colours``: draw only these colours; ``word``: caption the colour with this word instead
    ("a blorp circle in the top left" for a purple one: a concept to teach a trained model);
    ``edge_range``: the shape's outer edge, in axis fractions from its near border (``render``).
    """
    for c in colours:
        if c not in COLOURS:
            raise ValueError(f"colour {c!r}: choose from {tuple(COLOURS)}")
    if not 8 <= min_side <= max_side:
        raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 1.0 <= max_aspect <= 2.5:
        raise ValueError(
            f"max_aspect {max_aspect} must be in [1, 2.5] (the placement rule's range)"
        )
    colour, shape, position = _combination(index, seed, colours)
    rng = np.random.default_rng((seed, 1, index))
    height, width = _size(rng, min_side, max_side, max_aspect, square_fraction)
    image = render(colour, shape, position, height, width, rng=rng, edge_range=edge_range)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {
        "key": f"synthetic-{seed}-{index:07d}",
        "image": buf.getvalue(),
        "caption": caption_for(colour, shape, position)
        if word is None
        else f"a {word} {shape} in the {position}",
        "height": height,
        "width": width,
    }


def examples(n: int, seed: int = 0, *, start: int = 0, **options) -> Iterator[dict]:
    """Examples start .. start + n - 1: {"key", "image" (PNG bytes), "caption", "height", "width"}.

    Deterministic: example i depends only on (i, seed, options), so any n >= 72 (from a multiple
    of 72) covers all 72 captions equally and ``examples(10)`` is a prefix of ``examples(100)``.
    Sizes: short side log-uniform in [min_side, max_side] (24..160: about a third under 48 px);
    aspect 1 with probability ``square_fraction`` (0.2), else log-uniform up to ``max_aspect``
    (2), tall or wide with equal odds. Options: see ``example``.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n={n} and start={start} must be >= 0")
    for i in range(start, start + n):
        yield example(i, seed, **options)


# ----------------------------------------------------------------------------- scoring

_OPP = np.array([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])  # RGB -> (a, b)
_NAMES = tuple(COLOURS)
_UNIT = np.array([_OPP.T @ np.asarray(COLOURS[c], float) for c in _NAMES])  # [6, 2]
_UNIT /= np.linalg.norm(_UNIT, axis=1, keepdims=True)


def _chroma(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> opponent-plane chroma vectors float64 [H, W, 2], background removed."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}; "
            "convert model output in [-1, 1] with ((x + 1) * 127.5).round().clip(0, "
            "255).astype(np.uint8)"
        )
    v = image.astype(np.float64) @ _OPP  # [H, W, 2]
    quiet = np.hypot(v[..., 0], v[..., 1]) < CHROMA_GATE
    if quiet.any():
        v = v - np.median(v[quiet], axis=0)
    return v


def _candidate(v: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(palette index, bool [H, W] mask) of the largest solid single-colour blob, or None."""
    h, w = v.shape[:2]
    loud = np.hypot(v[..., 0], v[..., 1]) >= CHROMA_GATE
    label = np.argmax(v @ _UNIT.T, axis=-1)  # nearest hue = largest cosine; [H, W]
    best, best_area = None, max(6, MIN_AREA * h * w)
    for c in range(len(_NAMES)):
        parts, count = ndimage.label(loud & (label == c))
        if count == 0:
            continue
        areas = np.bincount(parts.ravel())[1:]
        for k in np.argsort(areas)[::-1][:3]:  # the few largest, solid ones
            if areas[k] < best_area:
                break
            mask = parts == k + 1
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            if MIN_SOLIDITY * box <= areas[k] <= MAX_AREA * h * w:
                best, best_area = (c, mask), areas[k]
                break
    return best


def _alpha(v: np.ndarray, colour: int, mask: np.ndarray) -> np.ndarray:
    """Shape coverage float [H, W] in [0, 1] near ``mask`` (zero elsewhere)."""
    proj = v @ _UNIT[colour]  # [H, W]
    full = np.percentile(proj[mask], 90)
    near = ndimage.binary_dilation(mask, iterations=3)
    # Symmetric soft threshold: noise below ALPHA_FLOOR goes to 0, the 0.5 contour stays put.
    alpha = (proj / full - ALPHA_FLOOR) / (1 - 2 * ALPHA_FLOOR)
    return np.where(near, np.clip(alpha, 0.0, 1.0), 0.0)


def _box(alpha: np.ndarray) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """((x0, y0, w, h), (cut_x, cut_y)) of the shape from alpha's column / row maxima.

    The maxima's sum is the extent and their centroid the middle. cut is -1 / +1 where the shape
    runs into the low / high image border on that axis (0: neither or both); the cut side is
    restored from the other axis, since every shape's box is square.
    """
    box, cuts = [], []
    for axis in (0, 1):  # max over rows -> profile along x; over columns -> along y
        prof = alpha.max(axis=axis)
        extent = prof.sum()
        lo_cut, hi_cut = prof[0] >= 0.5, prof[-1] >= 0.5
        if lo_cut and not hi_cut:
            lo, cut = 0.0, -1
        elif hi_cut and not lo_cut:
            lo, cut = prof.size - extent, 1
        else:
            lo, cut = (prof * (np.arange(prof.size) + 0.5)).sum() / extent - extent / 2, 0
        box.append([lo, extent])
        cuts.append(cut)
    for ax in (0, 1):
        (lo, size), other = box[ax], box[1 - ax][1]
        if cuts[ax] and other > size:
            box[ax] = [lo + size - other if cuts[ax] < 0 else lo, other]
    (x0, w), (y0, h) = box
    return (x0, y0, w, h), (cuts[0], cuts[1])


def _moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centroid (x, y), std (x, y)) of a non-negative map [H, W]."""
    out = []
    for axis in (0, 1):
        prof = m.sum(axis=axis)
        pos = np.arange(prof.size) + 0.5
        mean = (prof * pos).sum() / prof.sum()
        out.append((mean, math.sqrt(max((prof * (pos - mean) ** 2).sum() / prof.sum(), 1e-6))))
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def _fit(alpha, shape: str, box, cut: tuple[int, int], blur: float, steps: int = 2):
    """Refine ``box`` for ``shape`` so its blurred template's centroid and spread match alpha's.

    An axis cut by one border (``cut`` from ``_box``) keeps the edge away from that border and
    takes the other axis's size.
    """
    h, w = alpha.shape
    c_obs, s_obs = _moments(alpha)
    start, size = np.array(box[:2], float), np.array(box[2:], float)
    free = [not (cut[ax] and not cut[1 - ax]) for ax in (0, 1)]
    for _ in range(steps):
        t = _template(shape, (*start, *size), h, w, blur)
        if t.sum() < 1.0:  # the template fell off the image: keep the last box
            break
        c_t, s_t = _moments(t)
        scale = s_obs / s_t
        new_size = np.clip(size * scale, 1.0, 2.0 * max(h, w))
        new_mid = c_obs - (c_t - (start + size / 2)) * scale
        for ax in (0, 1):
            if free[ax]:
                start[ax], size[ax] = new_mid[ax] - new_size[ax] / 2, new_size[ax]
        for ax in (0, 1):
            if not free[ax]:
                end = start[ax] + size[ax]
                size[ax] = size[1 - ax]
                start[ax] = end - size[ax] if cut[ax] < 0 else start[ax]
    return (*start, *size)


def _template(shape: str, box, height: int, width: int, blur: float) -> np.ndarray:
    """Coverage of ``shape`` in ``box``, blurred by ``blur`` px and soft-thresholded like alpha."""
    if blur == 0:
        t = coverage(shape, box, height, width)
    else:
        pad = int(math.ceil(3 * blur))  # the shape goes on past a border it is cut by
        x0, y0, bw, bh = box
        t = coverage(shape, (x0 + pad, y0 + pad, bw, bh), height + 2 * pad, width + 2 * pad)
        t = ndimage.gaussian_filter(t, blur, mode="constant")[pad:-pad, pad:-pad]
        t = t / max(float(t.max()), 1e-6)
    return np.clip((t - ALPHA_FLOOR) / (1 - 2 * ALPHA_FLOOR), 0.0, 1.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(float(np.maximum(a, b).sum()), 1e-9))


def analyse(image: np.ndarray) -> dict:
    """The scorer's working: {"colour", "shape", "position", "ious", "box", "centroid"}."""
    out = {
        "colour": None,
        "shape": None,
        "position": None,
        "ious": None,
        "box": None,
        "centroid": None,
    }
    v = _chroma(image)
    found = _candidate(v)
    if found is None:
        return out
    colour, mask = found
    alpha = _alpha(v, colour, mask)  # [H, W]
    h, w = alpha.shape
    out["colour"] = _NAMES[colour]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = (alpha * ys).sum() / alpha.sum(), (alpha * xs).sum() / alpha.sum()
    out["centroid"] = (float(cy), float(cx))
    if abs(cy / h - 0.5) >= DEAD_ZONE and abs(cx / w - 0.5) >= DEAD_ZONE:
        out["position"] = f"{'top' if cy < h / 2 else 'bottom'} {'left' if cx < w / 2 else 'right'}"
    box, cut = _box(alpha)
    out["box"] = tuple(float(t) for t in box)
    if min(box[2], box[3]) >= 1.5:
        ious = {}
        for s in SHAPES:
            for b in BLURS:
                t = _template(s, _fit(alpha, s, box, cut, b), h, w, b)
                ious[s] = max(ious.get(s, 0.0), _iou(alpha, t))
        out["ious"] = ious
        shape = max(ious, key=ious.get)
        out["shape"] = shape if ious[shape] >= MIN_IOU else None
    return out


def classify(image: np.ndarray) -> tuple[str | None, str | None, str | None]:
    """uint8 [H, W, 3] -> (colour, shape, position); None where undecidable."""
    a = analyse(image)
    return a["colour"], a["shape"], a["position"]


def score(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Whether ``image`` shows ``caption``: {"colour", "shape", "position", "all"} -> bool."""
    want = parse_caption(caption)
    got = classify(image)
    out = {k: g == t for k, g, t in zip(("colour", "shape", "position"), got, want, strict=True)}
    out["all"] = all(out.values())
    return out


def accuracy(images, captions) -> dict[str, float]:
    """Mean of ``score`` over images uint8 [N, H, W, 3] (or a list) and N captions."""
    scores = [score(np.asarray(im), c) for im, c in zip(images, captions, strict=True)]
    if not scores:
        raise ValueError("accuracy needs at least one image")
    return {
        k: float(np.mean([s[k] for s in scores])) for k in ("colour", "shape", "position", "all")
    }
