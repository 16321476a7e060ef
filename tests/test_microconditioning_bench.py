"""Pure helpers of benchmarks/microconditioning.py against closed-form and rendered references."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sdxl_jax.data import buckets, synthetic

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "microconditioning.py"
_SPEC = importlib.util.spec_from_file_location("microconditioning", _PATH)
mc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mc)


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    out = ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_edge_width_is_the_blur_of_a_step_edge(sigma):
    # A Gaussian blur of width s on an (almost) sharp edge of width w0 gives sqrt(w0^2 + s^2).
    img = synthetic.render("blue", "square", "top left", 64, 64, background=(120, 120, 120))
    w0 = mc.edge_width(img)
    assert w0 < 0.6
    assert mc.edge_width(_blurred(img, sigma)) == pytest.approx(np.hypot(w0, sigma), rel=0.15)


def test_edge_width_ignores_contrast():
    a = synthetic.render("red", "circle", "top right", 64, 64, background=(100, 100, 100))
    b = (100 + (a.astype(int) - 100) // 3).astype(np.uint8)  # a third of the contrast
    assert mc.edge_width(b) == pytest.approx(mc.edge_width(a), rel=0.1)
    assert np.isnan(mc.edge_width(np.full((16, 16, 3), 90, np.uint8)))


@pytest.mark.parametrize("position", synthetic.POSITIONS)
def test_placement_matches_the_rendered_box(position):
    img = synthetic.render("green", "circle", position, 64, 64)
    x0, y0, d, _ = synthetic.shape_box("circle", position, 64, 64, size=0.29, edge=(0.24, 0.24))
    p = mc.placement(synthetic.analyse(img), 64, 64)
    assert p["whole"] and not p["cut"]
    assert p["margin_x"] == pytest.approx(min(x0, 64 - x0 - d), abs=1.0)
    assert p["margin_y"] == pytest.approx(min(y0, 64 - y0 - d), abs=1.0)


@pytest.mark.parametrize("position", synthetic.POSITIONS)
def test_a_centred_crop_of_a_2_to_1_image_cuts_the_shape(position):
    # 64x128 -> 64x64 centre crop at left 32: the shape's outer edge (0.24 * 128 = 31 px from
    # the border) falls just outside the window.
    img = synthetic.render("yellow", "square", position, 64, 128)
    crop = buckets.plan_crop((64, 128), (64, 64))
    assert (crop.top, crop.left) == (0, 32)
    p = mc.placement(synthetic.analyse(buckets.apply_crop(img, crop)), 64, 64)
    assert p["cut"] and not p["whole"] and p["margin_x"] < 1.0 < p["margin_y"]


def test_conditions_centre_the_crop_in_the_original():
    conds = mc.conditions(64, [(0, 32), (16, 0)], [24, 64, 256])
    assert [(c["original"], c["crop"]) for c in conds] == [
        ((64, 64), (0, 0)),
        ((64, 128), (0, 32)),
        ((96, 64), (16, 0)),
        ((24, 24), (0, 0)),
        ((256, 256), (0, 0)),
    ]
    assert len({c["name"] for c in conds}) == len(conds)
    for c in conds[1:3]:  # the crop a resize-to-cover of the original into 64x64 would make
        plan = buckets.plan_crop(c["original"], (64, 64))
        assert (plan.top, plan.left) == c["crop"]


def test_nearest_band():
    table = {"0-0": {"a": 0}, "1-10": {"a": 1}, "11-20": {"a": 2}}
    assert mc.nearest_band(table, 0)[0] == "0-0"
    assert mc.nearest_band(table, 16)[0] == "11-20"
    assert mc.nearest_band(table, 32) == ("11-20", {"a": 2})
