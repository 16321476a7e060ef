"""Buckets: assignment worked by hand, generated sets, and crops checked against source pixels.

References are independent of the code under test: logs of aspect ratios computed here, PIL's
whole-image resize sliced at the recorded coordinates, and a closed form for linear gradients.
"""

import math

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import buckets as B
from tests.cases import case

SDXL = B.SDXL_BUCKETS


def log_nearest(sizes, h, w):
    """Reference assignment: argmin of |log(h/w) - log(bh/bw)| in floats."""
    d = [abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in sizes]
    return int(np.argmin(d)), sorted(d)


# --- the paper's table -----------------------------------------------------------------------


def test_sdxl_table_matches_the_paper():
    assert len(SDXL) == 40 and len(set(SDXL)) == 40
    for h, w in SDXL:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.9 * 1024**2 <= h * w <= 1024**2
    assert (1344, 704) not in SDXL  # the paper's one asymmetry
    assert B.bucket_set("sdxl_1024").sizes == SDXL
    assert B.bucket_set("sdxl_1024").aspect_range == (0.25, 4.0)


# --- assignment ------------------------------------------------------------------------------


def test_landscape_1000x1500_by_hand():
    # h/w = 2/3: log = -0.405465. Nearby buckets (h/w, log, distance):
    #   832x1216: 0.684211, -0.379490, 0.025975   <- nearest
    #   832x1152: 0.722222, -0.325422, 0.080043
    #   768x1280: 0.600000, -0.510826, 0.105361
    #   896x1152: 0.777778, -0.251314, 0.154151
    bset = B.bucket_set("sdxl_1024")
    assert abs(math.log(1000 / 1500) - math.log(832 / 1216) + 0.025975) < 1e-6
    assert abs(math.log(1000 / 1500) - math.log(832 / 1152) + 0.080043) < 1e-6
    assert abs(math.log(1000 / 1500) - math.log(768 / 1280) - 0.105361) < 1e-6
    assert SDXL[bset.nearest(1000, 1500)] == (832, 1216)
    assert SDXL[bset.nearest(1500, 1000)] == (1216, 832)  # portrait mirrors it
    assert bset.in_range(1000, 1500)


def test_squares_go_to_1024():
    bset = B.bucket_set("sdxl_1024")
    for s in (1, 7, 512, 1024, 1025, 4000):
        assert SDXL[bset.nearest(s, s)] == (1024, 1024)


def test_extreme_aspect_is_out_of_range():
    bset = B.bucket_set("sdxl_1024")
    assert not bset.in_range(1, 10) and not bset.in_range(10, 1)
    assert not bset.in_range(1, 10, tolerance=1.25)  # 0.1 < 0.25 / 1.25 = 0.2
    assert bset.in_range(1, 5, tolerance=1.25)  # exactly 0.2: the bound is inclusive
    assert not bset.in_range(1, 5)
    assert bset.in_range(512, 2048) and bset.in_range(2048, 512)  # the extreme buckets
    assert not bset.in_range(511, 2048)
    # Out of range still has a nearest bucket: the most extreme one.
    assert SDXL[bset.nearest(1, 10)] == (512, 2048)
    with pytest.raises(ValueError, match="tolerance"):
        bset.in_range(1, 1, tolerance=0.5)


def test_nearest_matches_float_reference():
    rng = np.random.default_rng(0)
    for name in ("sdxl_1024", "sdxl_256", "tiny_32", "square_512"):
        bset = B.bucket_set(name)
        for h, w in rng.integers(1, 5000, size=(2000, 2)).tolist():
            ref, d = log_nearest(bset.sizes, h, w)
            if len(d) > 1 and d[1] - d[0] < 1e-9:
                continue  # near-tie: decided exactly below
            assert bset.nearest(h, w) == ref, (name, h, w)


def test_ties_go_to_the_lower_index():
    # A 2:1 image is equally far (log 2) from 4:1 and 1:1, in either order.
    assert B.BucketSet("t", ((4, 1), (1, 1))).nearest(2, 1) == 0
    assert B.BucketSet("t", ((1, 1), (4, 1))).nearest(2, 1) == 0
    # A square between 1:2 and 2:1.
    assert B.BucketSet("t", ((64, 128), (128, 64))).nearest(9, 9) == 0


def test_assign_marks_out_of_range():
    bset = B.bucket_set("sdxl_1024")
    got = bset.assign([1000, 1, 1024, 3000], [1500, 10, 1024, 700], tolerance=1.0)
    assert got.dtype == np.int16
    assert got.tolist() == [SDXL.index((832, 1216)), -1, SDXL.index((1024, 1024)), -1]


def test_unknown_bucket_set_names_the_choices():
    with pytest.raises(ValueError, match="sdxl_1024"):
        B.bucket_set("sdxl_2048")


# --- generated sets --------------------------------------------------------------------------


def check_generated(bset, pixels, step, max_aspect, min_fill):
    sizes = bset.sizes
    assert len(set(sizes)) == len(sizes) > 0
    for h, w in sizes:
        assert h % step == 0 and w % step == 0 and h > 0 and w > 0
        assert h * w <= pixels
        assert 1 / max_aspect <= h / w <= max_aspect
        # Each kept size is a row maximum, a column maximum, or fills the budget.
        row_max = (w + step) * h > pixels
        col_max = (h + step) * w > pixels
        assert row_max or col_max or h * w >= min_fill * pixels
    ratios = [h / w for h, w in sizes]
    assert ratios == sorted(ratios)
    assert {(w, h) for h, w in sizes} == set(sizes)  # symmetric
    # Every grid row within the aspect bound has its largest width.
    for h in range(step, pixels // step + 1, step):
        w = pixels // h // step * step
        if w >= step and 1 / max_aspect <= h / w <= max_aspect:
            assert (h, w) in sizes


@pytest.mark.parametrize(
    "pixels,step,max_aspect,min_fill",
    [(1024**2, 64, 4.0, 0.9), (512**2, 32, 4.0, 0.9), (32**2, 8, 4.0, 0.9), (3000, 16, 2.5, 1.0)],
)
def test_generate_rules(pixels, step, max_aspect, min_fill):
    bset = B.generate("g", pixels, step, max_aspect=max_aspect, min_fill=min_fill)
    check_generated(bset, pixels, step, max_aspect, min_fill)


def test_presets_are_well_formed():
    for name, pixels, step in [
        ("sdxl_512", 512**2, 32),
        ("sdxl_256", 256**2, 32),
        ("tiny_32", 32**2, 16),
        ("tiny_64", 64**2, 16),
    ]:
        check_generated(B.bucket_set(name), pixels, step, 4.0, 0.9)
    for name, side in [("square_256", 256), ("square_512", 512), ("square_1024", 1024)]:
        assert B.bucket_set(name).sizes == ((side, side),)
    assert set(B.bucket_set("tiny_32").sizes) == {(16, 64), (16, 48), (32, 32), (48, 16), (64, 16)}


def test_generate_1024_is_the_paper_plus_its_missing_mirror():
    g = B.generate("x", 1024**2, 64)
    assert set(g.sizes) == set(SDXL) | {(1344, 704)}
    # sdxl_512 is the same table at half the side.
    assert set(B.bucket_set("sdxl_512").sizes) == {(h // 2, w // 2) for h, w in g.sizes}


def test_generate_square_only():
    assert B.generate("s", 1000**2, 64, square_only=True).sizes == ((960, 960),)
    assert B.generate("s", 32**2, 8, square_only=True).sizes == ((32, 32),)


# --- crop planning ---------------------------------------------------------------------------


def test_plan_crop_1000x1500_by_hand():
    # Cover (832, 1216): scale = max(832/1000, 1216/1500) = 0.832 -> resized (832, 1248).
    c = B.plan_crop((1000, 1500), (832, 1216), bucket=14, rng=None)
    assert (c.bucket, c.target_size, c.resized_size) == (14, (832, 1216), (832, 1248))
    assert (c.top, c.left, c.flip) == (0, 16, False)  # centre of 32 spare columns
    assert c.crop_coords_top_left == (0, 16)
    c = B.plan_crop((1000, 1500), (832, 1216), rng=None, flip=True)
    assert c.crop_coords_top_left == (0, 1248 - 16 - 1216)


@pytest.mark.parametrize("seed", range(3))
def test_plan_crop_covers_and_keeps_aspect(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        h, w = rng.integers(1, 3000, size=2).tolist()
        bh, bw = SDXL[rng.integers(len(SDXL))]
        c = B.plan_crop((h, w), (bh, bw), rng=rng)
        rh, rw = c.resized_size
        assert rh >= bh and rw >= bw and (rh == bh or rw == bw)
        s = max(bh / h, bw / w)
        assert abs(rh - h * s) <= 0.5 + 1e-9 and abs(rw - w * s) <= 0.5 + 1e-9
        assert 0 <= c.top <= rh - bh and 0 <= c.left <= rw - bw


def test_random_crop_is_uniform_over_offsets():
    rng = np.random.default_rng(0)
    lefts = [B.plan_crop((100, 300), (32, 32), rng=rng).left for _ in range(6500)]
    counts = np.bincount(lefts, minlength=65)
    assert len(counts) == 65  # resized (32, 96): offsets 0..64, all reachable
    assert counts.min() > 50 and counts.max() < 150  # ~100 each
    centre = B.plan_crop((100, 300), (32, 32), rng=None)
    assert (centre.top, centre.left) == (0, 32)


# --- crops checked against the pixels --------------------------------------------------------


def coded_image(h, w, ky, kx):
    """R = ky * row, G = kx * col, B = 128: each pixel's value encodes its coordinates."""
    rows = np.arange(h)[:, None] * ky + np.zeros((1, w))
    cols = np.zeros((h, 1)) + np.arange(w)[None, :] * kx
    img = np.stack([rows, cols, np.full((h, w), 128.0)], axis=-1)
    assert img.max() <= 255
    return img.astype(np.uint8)


def pil_reference(img, crop):
    """Resize the whole image with PIL and slice at the recorded (mirrored if flipped) coords."""
    rh, rw = crop.resized_size
    resized = np.asarray(Image.fromarray(img).resize((rw, rh), Image.Resampling.BICUBIC))
    if crop.flip:
        resized = resized[:, ::-1]
    t, left = crop.crop_coords_top_left
    bh, bw = crop.target_size
    return resized[t : t + bh, left : left + bw]


def closed_form_check(img, crop, ky, kx, margin=3):
    """A linear ramp resamples to itself: output (i, j) shows the source coordinate it maps to.

    Resized pixel y covers source y_src = (y + 0.5) * H / rh - 0.5; a one-pixel error in the
    recorded (top, left) moves R or G by more than the tolerance (checked below).
    """
    out = apply(img, crop)
    (h, w), (rh, rw), (bh, bw) = img.shape[:2], crop.resized_size, crop.target_size
    t, left = crop.crop_coords_top_left
    y_src = (t + np.arange(bh) + 0.5) * h / rh - 0.5
    x_view = (left + np.arange(bw) + 0.5) * w / rw - 0.5  # in the (maybe mirrored) source
    x_src = (w - 1 - x_view) if crop.flip else x_view
    ok_y = (y_src > margin) & (y_src < h - 1 - margin)  # away from the filter's edge clamping
    ok_x = (x_src > margin) & (x_src < w - 1 - margin)
    assert ok_y.sum() > bh // 3 and ok_x.sum() > bw // 3
    r, g = out[:, :, 0].astype(float), out[:, :, 1].astype(float)
    r_err = lambda dy: np.abs(r[ok_y] - ky * (y_src[ok_y, None] + dy * h / rh)).max()
    g_err = lambda dx: np.abs(g[:, ok_x] - kx * (x_src[None, ok_x] + dx * w / rw)).max()
    assert r_err(0) <= 1.0 and g_err(0) <= 1.0
    # The check has teeth: coordinates off by one resized pixel either way would fail it.
    assert min(r_err(-1), r_err(1), g_err(-1), g_err(1)) > 1.0


def apply(img, crop):
    out = B.apply_crop(img, crop)
    assert out.dtype == np.uint8 and out.shape == (*crop.target_size, 3)
    assert out.flags.c_contiguous
    return out


CASES = [  # (source h, w, ky, kx, bucket): downscale, upscale, exact fit in one side
    (120, 80, 2, 3, (64, 64)),
    (40, 30, 6, 8, (64, 64)),
    (90, 120, 2, 2, (48, 96)),
    (200, 63, 1, 4, (96, 32)),
]


@pytest.mark.parametrize("h,w,ky,kx,bucket", CASES)
def test_crop_pixels_match_source(h, w, ky, kx, bucket):
    img = coded_image(h, w, ky, kx)
    for mode in ("centre", "random", "random_flip", "centre_flip"):
        rng = np.random.default_rng(h * w) if mode.startswith("random") else None
        for _ in range(4 if rng else 1):
            with case(mode=mode):
                crop = B.plan_crop((h, w), bucket, rng=rng, flip=mode.endswith("flip"))
                np.testing.assert_array_equal(apply(img, crop), pil_reference(img, crop))
                closed_form_check(img, crop, ky, kx)


def test_flip_mirrors_the_same_window():
    img = coded_image(120, 80, 2, 3)
    crop = B.plan_crop((120, 80), (64, 64), rng=np.random.default_rng(1))
    flipped = B.Crop(crop.bucket, crop.target_size, crop.resized_size, crop.top, crop.left, True)
    np.testing.assert_array_equal(apply(img, flipped), apply(img, crop)[:, ::-1])
    assert flipped.crop_coords_top_left[1] == crop.resized_size[1] - crop.left - 64
    # Columns read right to left after the mirror: G (the column code) decreases.
    assert np.all(np.diff(apply(img, flipped)[:, :, 1].astype(int), axis=1) <= 0)


def test_sdxl_size_crop_against_pil():
    img = coded_image(1000, 1500, 0.25, 0.17)
    bset = B.bucket_set("sdxl_1024")
    b = bset.nearest(1000, 1500)
    crop = B.plan_crop((1000, 1500), bset.sizes[b], bucket=b, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(apply(img, crop), pil_reference(img, crop))


def test_apply_crop_rejects_bad_input():
    crop = B.plan_crop((10, 10), (8, 8), rng=None)
    with pytest.raises(ValueError, match="uint8"):
        B.apply_crop(np.zeros((10, 10), np.uint8), crop)
    bad = B.Crop(0, (8, 8), (10, 10), 5, 0, False)
    with pytest.raises(ValueError, match="does not fit"):
        B.apply_crop(np.zeros((10, 10, 3), np.uint8), bad)
