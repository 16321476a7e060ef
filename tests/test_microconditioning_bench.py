"""benchmarks/microconditioning.py: its measures against closed forms and rendered references,
its bootstrap against scipy's, and the whole study at --quick size (well formed, not the effect)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from sdxl_jax.data import buckets, synthetic

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location(
    "microconditioning_measure", _BENCH / "microconditioning_measure.py"
)
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


def test_per_image_scores_renders_against_their_captions():
    imgs, caps = [], []
    for c, s, p in [("red", "circle", "top left"), ("blue", "square", "bottom right")]:
        imgs.append(synthetic.render(c, s, p, 64, 64))
        caps.append(synthetic.caption_for(c, s, p))
    wrong = synthetic.caption_for("green", "triangle", "top right")
    v = mc.per_image(np.stack(imgs), [caps[0], wrong])
    assert v["all"].tolist() == [1.0, 0.0] and v["colour"].tolist() == [1.0, 0.0]
    assert v["cut"].tolist() == [0.0, 0.0] and v["whole"].tolist() == [1.0, 1.0]
    assert np.isnan(mc.per_image(np.stack(imgs), [None, None])["all"]).all()


def test_paired_bootstrap_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = (rng.random(400) < 0.2).astype(float)
    b = (rng.random(400) < 0.5).astype(float)
    b[:10] = np.nan  # left out with their pairs
    got = mc.paired_difference(a, b, resamples=4000)
    ok = np.isfinite(b)
    assert got["n"] == 390 and got["diff"] == pytest.approx(b[ok].mean() - a[ok].mean())
    ref = stats.bootstrap(
        (b[ok] - a[ok],), np.mean, method="percentile", n_resamples=4000, random_state=1
    ).confidence_interval
    assert got["lo"] == pytest.approx(ref.low, abs=0.012)
    assert got["hi"] == pytest.approx(ref.high, abs=0.012)


def test_feature_distance_is_zero_on_itself_and_grows_with_blur():
    rng = np.random.default_rng(1)
    imgs = np.stack([
        synthetic.render(*[rng.choice(x) for x in (list(synthetic.COLOURS), synthetic.SHAPES,
                                                   synthetic.POSITIONS)], 64, 64, rng=rng)
        for _ in range(300)
    ])  # fmt: skip
    assert mc.features(imgs).shape == (300, 256)
    half = mc.feature_distance(imgs[:150], imgs[150:])  # same distribution: sampling noise
    blurred = np.stack([_blurred(i, 2.0) for i in imgs[:150]])
    assert mc.feature_distance(blurred, imgs[150:]) > 2 * half
    assert mc.feature_distance(imgs, imgs) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow(seconds=240)
def test_quick_study_runs_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(_BENCH / "microconditioning.py"), "--quick",
         "--workdir", str(tmp_path / "w"), "--sizes", "16", "128"],
        cwd=root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    pattern = (
        r"-?\d+\.\d+(%| px) vs at .* -?\d+\.\d+(%| px), difference [+-]\d+\.\d+ \[[+-]\d+\.\d+"
    )

    for name in ("crop effect", "offset effect", "size effect", "baseline"):
        hits = [x for x in lines if x.startswith(name + ":")]
        assert hits and all(re.search(pattern, x) for x in hits if name != "offset effect" or
                            "not measurable" not in x), (name, lines)  # fmt: skip
    result = json.loads((tmp_path / "w" / "study" / "microconditioning.json").read_text())
    assert set(result["table2"]) == {"discard", "nocond", "cond"}
    for row in result["table2"].values():
        assert row["n"] == 72 and 0 <= row["all"] <= 1 and row["fd"] >= 0
    for name in ("crop_effect.png", "size_effect.png"):
        from PIL import Image

        with Image.open(tmp_path / "w" / "study" / name) as im:
            assert im.size[0] > 12 * 64 and im.size[1] >= 3 * 128
    # The three bases trained from the same data and budget; (b) with zeroed conditioning.
    for v in ("discard", "nocond", "cond"):
        cfg = json.loads((tmp_path / "w" / f"microcond_{v}" / "config.json").read_text())
        assert cfg["optim"]["total_steps"] == 12 and cfg["model"]["preset"] == "micro"
        assert cfg["step"]["micro_conditioning"] is (v != "nocond")
        assert cfg["data"]["drop_small"] is (v == "discard")
    # The study's autoencoder: the 64 px bucket in 32 px windows (study.AUTOENCODER).
    ae = json.loads((tmp_path / "w" / "autoencoder" / "config.json").read_text())
    assert ae["data"]["bucket_set"] == "tiny_square_64" and ae["ae"]["crop"] == 32
    # A rerun reuses trainings and samples.
    again = subprocess.run(
        [sys.executable, str(_BENCH / "microconditioning.py"), "--quick",
         "--workdir", str(tmp_path / "w"), "--sizes", "16", "128"],
        cwd=root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0 and "sampled" not in again.stderr
    assert [x for x in again.stdout.splitlines() if x.startswith("crop effect")] == [
        x for x in lines if x.startswith("crop effect")
    ]
