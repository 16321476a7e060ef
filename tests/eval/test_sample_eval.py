"""``python -m sdxl_jax.sample --eval``: generate for a prompt set, score, write eval.json; a
guidance sweep writes one folder and one row per scale."""

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_jax import sample
from sdxl_jax.data import synthetic


def test_synthetic_sweep_writes_one_row_and_folder_per_scale(tiny_sdxl, tmp_path, capsys):
    base, _ = tiny_sdxl
    out = tmp_path / "ev"
    rc = sample.main([
        "--checkpoint", str(base), "--prompt-set", "synthetic", "--eval", "synthetic",
        "--eval-count", "3", "--eval-seed", "1", "--num-images", "2", "--guidance", "1,4",
        "--height", "32", "--width", "32", "--steps", "2", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["guidance"] for r in report["results"]] == [1.0, 4.0]
    assert report["prompt_set"] == {
        "name": "synthetic", "kind": "synthetic", "prompts": 3, "images_per_prompt": 2,
    }  # fmt: skip
    for row, g in zip(report["results"], ("1", "4"), strict=True):
        manifest = json.loads((out / f"guidance_{g}" / "manifest.json").read_text())
        assert len(manifest["images"]) == 6 and (out / f"guidance_{g}" / "grid.png").exists()
        assert {r["guidance"] for r in manifest["images"]} == {float(g)}
        assert row["synthetic_images"] == 6
        # the scores are the synthetic scorer's on the written images
        imgs = [
            np.asarray(Image.open(out / f"guidance_{g}" / r["file"])) for r in manifest["images"]
        ]
        want = synthetic.accuracy(imgs, [r["prompt"] for r in manifest["images"]])
        assert {k: row[f"synthetic_{k}"] for k in want} == want
        assert sum(c["count"] for c in row["per_category"].values()) == 6
        assert row["timings"]["scoring_s"] >= 0
    err = capsys.readouterr().err
    assert "guidance 1: synthetic_colour" in err and "eval.json" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--guidance", "3,5"], "several --guidance values are a sweep: add --eval"),
        (["--eval", "fid,bleu"], "unknown metric bleu"),
        (["--eval", "fid"], "--eval fid needs --inception"),
        (["--eval", "is", "--inception", "missing.safetensors"], "does not exist; expected"),
        (["--eval", "clip"], "--eval clip needs --clip DIR"),
        (["--eval", "synthetic", "--eval-count", "0"], "--eval-count must be at least 1"),
    ],
)
def test_bad_eval_arguments_fail_before_loading(args, message, tiny_sdxl, tmp_path, capsys):
    base, _ = tiny_sdxl
    rc = sample.main(["--checkpoint", str(base), "--prompt-set", "synthetic",
                      "--out", str(tmp_path / "o"), *args])  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow(seconds=60)
def test_fid_clip_sweep_on_a_prepared_dataset(tiny_sdxl, tmp_path, tmp_path_factory, capsys):
    """Captions of a prepared dataset, its images the FID reference: one row per guidance scale
    with FID, KID and CLIP score, sweep.png; each row's FID is `python -m sdxl_jax.eval fid` on
    that scale's folder against the same reference."""
    from sdxl_jax.eval import __main__ as eval_cli
    from tests.data.fixtures import prepared_dataset
    from tests.eval.fixtures import make_clip_folder
    from tests.models.test_inception import reference

    base, _ = tiny_sdxl
    _, _, weights = reference(tmp_path_factory)
    clip, _ = make_clip_folder(tmp_path / "clip")
    data, _ = prepared_dataset(tmp_path / "data", 6, ("tiny_square_32",))
    out, cache = tmp_path / "ev", tmp_path / "cache"
    rc = sample.main([
        "--checkpoint", str(base), "--prompt-set", str(data), "--eval", "fid,kid,clip",
        "--eval-count", "4", "--inception", weights, "--clip", str(clip), "--dims", "64",
        "--stats-cache", str(cache), "--guidance", "1.5,6", "--height", "32", "--width", "32",
        "--steps", "2", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    rows = report["results"]
    assert [r["guidance"] for r in rows] == [1.5, 6.0]
    assert report["reference_images"] == 4 and report["prompt_set"]["kind"] == "dataset"
    assert set(report["extractors"]) == {"inception", "clip"}
    with Image.open(out / "sweep.png") as png:
        assert png.size[0] > 300 and png.mode in ("RGB", "RGBA")
    for row in rows:
        assert row["inception_images"] == row["clip_images"] == 4 and row["kid_subset_size"] == 4
        assert 0 <= row["clip_score"] <= 100 and row["fid"] > 0
    assert rows[0]["fid"] != rows[1]["fid"]
    # the second scale's folder scored again from the files, against the cached reference
    capsys.readouterr()
    assert eval_cli.main(["fid", "--inception", weights, "--images", str(out / "guidance_6"),
                          "--ref", report["reference_cache"], "--dims", "64"]) == 0  # fmt: skip
    fid = float(capsys.readouterr().out.strip().removeprefix("fid: "))
    assert fid == pytest.approx(rows[1]["fid"], rel=1e-5)
