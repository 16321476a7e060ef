"""The synthetic shapes dataset and its scorer.

The scorer is checked against the generator's intent (the caption each image was rendered
from), after resize-to-cover + crop done here with PIL (independently of buckets.py), and the
renders and the placement rule are checked against closed forms on the pixels themselves.
"""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdxl_jax.data import synthetic

# Bucket sizes (h, w) around 32^2 and 64^2 whose neighbouring aspects are at most ~1.7x apart,
# so a crop to the nearest one removes at most ~23% of a side.
BUCKETS_32 = [(32, 32), (24, 40), (40, 24), (24, 48), (48, 24)]
BUCKETS_64 = [(64, 64), (48, 80), (80, 48), (40, 96), (96, 40)]
FIELDS = ("colour", "shape", "position", "all")


@pytest.fixture(scope="module")
def renders():
    """One block of 72 examples (each caption once): [(image uint8 [H, W, 3], caption)]."""
    out = []
    for ex in synthetic.examples(72, seed=5):
        image = np.asarray(Image.open(io.BytesIO(ex["image"])))
        out.append((image, ex["caption"]))
    return out


def cover_crop(image, size, where="centre"):
    """Resize (PIL bicubic) to cover ``size`` = (h, w), then cut at the centre or a far corner."""
    (h, w), (bh, bw) = image.shape[:2], size
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC))
    top, left = {
        "centre": ((rh - bh) // 2, (rw - bw) // 2),
        "low": (0, 0),
        "high": (rh - bh, rw - bw),
    }[where]
    return resized[top : top + bh, left : left + bw]


def nearest(image, buckets):
    h, w = image.shape[:2]
    return min(buckets, key=lambda b: abs(math.log(h / w) - math.log(b[0] / b[1])))


def accuracy(pairs):
    scores = [synthetic.score(image, caption) for image, caption in pairs]
    return {k: float(np.mean([s[k] for s in scores])) for k in FIELDS}


def shape_mask(image, colour):
    """Pixels within 60 (RGB distance) of the palette colour: the shape, scorer-free."""
    return np.linalg.norm(image.astype(float) - synthetic.COLOURS[colour], axis=-1) < 60


# ----------------------------------------------------------------------------- dataset


def test_examples_are_deterministic_and_prefix_stable():
    a = list(synthetic.examples(6, seed=1))
    b = list(synthetic.examples(10, seed=1))
    assert [x["image"] for x in a] == [x["image"] for x in b[:6]]
    assert a == b[:6]
    assert list(synthetic.examples(2, seed=1, start=4)) == b[4:6]
    c = list(synthetic.examples(6, seed=2))
    assert all(x["image"] != y["image"] for x, y in zip(a, c, strict=True))
    assert len({x["key"] for x in a + b + c}) == len(a + c) + 4


def test_examples_decode_to_stated_size_and_caption_parses():
    for ex in synthetic.examples(30, seed=0):
        assert set(ex) == {"key", "image", "caption", "height", "width"}
        with Image.open(io.BytesIO(ex["image"])) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (ex["width"], ex["height"])
        colour, shape, position = synthetic.parse_caption(ex["caption"])
        assert synthetic.caption_for(colour, shape, position) == ex["caption"]


def test_every_block_of_72_covers_every_caption_once():
    captions = [ex["caption"] for ex in synthetic.examples(144, seed=3, max_side=24)]
    for block in (captions[:72], captions[72:]):
        assert len(set(block)) == 72
    assert captions[:72] != captions[72:]  # the order is reshuffled per block
    parsed = [synthetic.parse_caption(c) for c in captions[:72]]
    assert {p[0] for p in parsed} == set(synthetic.COLOURS) and len(synthetic.COLOURS) >= 6
    assert {p[1] for p in parsed} == set(synthetic.SHAPES) == {"circle", "square", "triangle"}
    assert {p[2] for p in parsed} == set(synthetic.POSITIONS) and len(synthetic.POSITIONS) == 4


def test_sizes_and_aspects_vary_and_include_small_images():
    sizes = [(ex["height"], ex["width"]) for ex in synthetic.examples(200, seed=0)]
    short = np.array([min(s) for s in sizes])
    aspect = np.array([h / w for h, w in sizes])
    assert short.min() >= 24 and max(max(s) for s in sizes) <= 320
    assert 0.2 < np.mean(short < 48) < 0.5  # about a third are small
    assert np.all((aspect >= 0.5) & (aspect <= 2.0))  # inside 1:2.5 .. 2.5:1 too
    assert np.mean(aspect == 1) > 0.1 and np.mean(aspect > 1.5) > 0.1
    assert np.mean(aspect < 1 / 1.5) > 0.1
    assert len(set(sizes)) > 150


def test_captions_round_trip_and_bad_input_names_the_fix():
    for combo in itertools.product(synthetic.COLOURS, synthetic.SHAPES, synthetic.POSITIONS):
        assert synthetic.parse_caption(synthetic.caption_for(*combo)) == combo
    assert synthetic.parse_caption("  A Red  circle in the Top Left. ") == (
        "red",
        "circle",
        "top left",
    )
    with pytest.raises(ValueError, match="not of the form"):
        synthetic.parse_caption("a red circle")
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        synthetic.parse_caption("a mauve circle in the top left")
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic.caption_for("red", "hexagon", "top left")


def test_chance_levels():
    c = synthetic.chance_levels()
    assert c == pytest.approx({"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 4, "all": 1 / 72})


# ----------------------------------------------------------------------------- renders


@pytest.mark.parametrize(
    "shape, fill", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)]
)
def test_render_draws_the_shape_closed_form(shape, fill):
    """Area = fill * d^2 with d = 0.29 * short side, centre of mass in the named quadrant."""
    h, w = 120, 200
    for position in synthetic.POSITIONS:
        image = synthetic.render("blue", shape, position, h, w)  # rng None: size 0.29, grey 110
        assert image.dtype == np.uint8 and image.shape == (h, w, 3)
        cov = (image[..., 2].astype(float) - 110) / (220 - 110)  # blue channel: grey -> blue
        d = 0.29 * min(h, w)
        assert cov.sum() == pytest.approx(fill * d * d, rel=0.01)
        ys, xs = np.nonzero(cov > 0.5)
        vert, horiz = position.split()
        assert (ys.mean() < h / 2) == (vert == "top") and (xs.mean() < w / 2) == (horiz == "left")
        assert np.all((ys < h / 2) == (vert == "top")) and np.all((xs < w / 2) == (horiz == "left"))


def test_backgrounds_are_muted_and_shapes_saturated(renders):
    opp = np.array([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
    for image, caption in renders[:24]:
        colour = synthetic.parse_caption(caption)[0]
        chroma = np.linalg.norm(image.astype(float) @ opp, axis=-1)
        exact = np.all(image == synthetic.COLOURS[colour], axis=-1)
        assert exact.any()  # the shape's interior is exactly the palette colour
        near = shape_mask(image, colour)
        assert np.percentile(chroma[~near], 90) <= 15
    hues = sorted(math.degrees(math.atan2(*(np.array(c, float) @ opp)[::-1])) % 360
                  for c in synthetic.COLOURS.values())  # fmt: skip
    gaps = np.diff(hues + [hues[0] + 360])
    assert gaps.min() >= 45


@pytest.mark.parametrize("axis", [0, 1])
def test_crops_removing_30_percent_keep_the_quadrant(renders, axis):
    """The placement rule, scorer-free: slicing up to 30% off a side at either end keeps the
    shape's centre of mass in its quadrant of the crop (and a 25% cut keeps some of it)."""
    for image, caption in renders:
        colour, _, position = synthetic.parse_caption(caption)
        full = shape_mask(image, colour).sum()
        n = image.shape[axis]
        for frac, far in itertools.product((0.25, 0.3), (False, True)):
            k = round(n * (1 - frac))
            sl = slice(n - k, n) if far else slice(0, k)
            crop = image[sl] if axis == 0 else image[:, sl]
            ys, xs = np.nonzero(shape_mask(crop, colour))
            vert, horiz = position.split()
            assert (ys.mean() < crop.shape[0] / 2) == (vert == "top"), (caption, frac, far)
            assert (xs.mean() < crop.shape[1] / 2) == (horiz == "left"), (caption, frac, far)
            if frac == 0.25:
                assert len(ys) >= 0.4 * full


def test_nearest_bucket_and_centred_crops_keep_most_of_the_shape(renders):
    """Scorer-free, in the original pixels: the window of the nearest bucket at either end, and
    the centred square, keep >= 70% of the shape."""
    for image, caption in renders:
        colour = synthetic.parse_caption(caption)[0]
        full = shape_mask(image, colour).sum()
        (h, w), (bh, bw) = image.shape[:2], nearest(image, BUCKETS_32)
        if bh * w > h * bw:  # the bucket is taller than the image: cut the width
            k = round(h * bw / bh)
            windows = [image[:, :k], image[:, w - k :]]
        else:
            k = round(w * bh / bw)
            windows = [image[:k], image[h - k :]]
        s = min(h, w)
        windows.append(image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s])
        for window in windows:
            assert shape_mask(window, colour).sum() >= 0.7 * full, caption


# ----------------------------------------------------------------------------- scorer


def test_scorer_is_exact_on_bucket_crops(renders):
    """100% on 32^2 / 64^2 centred crops and nearest-bucket crops at the centre and far ends."""
    pairs = []
    for image, caption in renders:
        for buckets in (BUCKETS_32, BUCKETS_64):
            pairs.append((cover_crop(image, buckets[0]), caption))  # square, centred
            for where in ("centre", "low", "high"):
                pairs.append((cover_crop(image, nearest(image, buckets), where), caption))
    assert accuracy(pairs) == {k: 1.0 for k in FIELDS}


def test_scorer_is_exact_on_originals(renders):
    assert accuracy(renders[::6]) == {k: 1.0 for k in FIELDS}


def test_scorer_tolerates_blur_and_noise(renders):
    rng = np.random.default_rng(0)
    pairs = []
    for (image, caption), buckets in itertools.product(renders, (BUCKETS_32, BUCKETS_64)):
        crop = cover_crop(image, nearest(image, buckets), "centre")
        radius = 0.8 * crop.shape[0] / 32  # PIL's radius is the Gaussian's sigma
        soft = Image.fromarray(crop).filter(ImageFilter.GaussianBlur(radius))
        noisy = np.asarray(soft).astype(float) + rng.normal(0.0, 10.0, crop.shape)
        pairs.append((np.clip(np.rint(noisy), 0, 255).astype(np.uint8), caption))
    acc = accuracy(pairs)
    assert acc["colour"] == 1.0 and acc["position"] == 1.0
    assert acc["shape"] >= 0.95 and acc["all"] >= 0.95


def test_scorer_rejects_the_wrong_caption(renders):
    colours, shapes, positions = list(synthetic.COLOURS), synthetic.SHAPES, synthetic.POSITIONS
    for image, caption in renders[:24]:
        colour, shape, position = synthetic.parse_caption(caption)
        wrong = synthetic.caption_for(
            colours[(colours.index(colour) + 1) % 6],
            shapes[(shapes.index(shape) + 1) % 3],
            positions[(positions.index(position) + 1) % 4],
        )
        s = synthetic.score(cover_crop(image, (32, 32)), wrong)
        assert s == {"colour": False, "shape": False, "position": False, "all": False}
    red_circle = synthetic.render("red", "circle", "top left", 64, 64)
    assert synthetic.classify(red_circle) == ("red", "circle", "top left")
    s = synthetic.score(red_circle, "a blue square in the top left")
    assert s == {"colour": False, "shape": False, "position": True, "all": False}


def test_scorer_finds_nothing_in_backgrounds_and_noise():
    rng = np.random.default_rng(0)
    for grey in (0, 45, 110, 185, 255):
        flat = np.full((32, 48, 3), grey, np.uint8)
        assert synthetic.classify(flat) == (None, None, None)
    tinted = synthetic.render("red", "circle", "top left", 32, 32, rng=rng)
    background = np.broadcast_to(tinted[-1:, -1:], tinted.shape).copy()  # a corner's colour
    assert synthetic.classify(background) == (None, None, None)
    saturated = np.full((32, 32, 3), synthetic.COLOURS["green"], np.uint8)
    assert synthetic.classify(saturated) == (None, None, None)  # no figure without a ground
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(60)]
    coarse = [
        np.asarray(
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((32, 32))
        )
        for _ in range(60)
    ]
    captions = [
        synthetic.caption_for(*c)
        for c in itertools.product(synthetic.COLOURS, synthetic.SHAPES, synthetic.POSITIONS)
    ]
    chance = synthetic.chance_levels()
    for images in (noise, coarse):
        pairs = [(im, captions[i]) for im, i in zip(images, rng.permutation(72), strict=False)]
        acc = accuracy(pairs)
        assert all(acc[k] <= chance[k] + 0.05 for k in FIELDS), acc
    assert sum(synthetic.classify(im)[0] is None for im in noise) >= 40


def test_position_is_undecided_in_the_middle():
    box = (16 - 5, 16 - 5, 10, 10)
    cov = synthetic.coverage("square", box, 32, 32)[..., None]
    image = np.rint(110 * (1 - cov) + np.array(synthetic.COLOURS["cyan"]) * cov).astype(np.uint8)
    assert synthetic.classify(image) == ("cyan", "square", None)


def test_scorer_wants_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        synthetic.classify(np.zeros((32, 32, 3), np.float32))
