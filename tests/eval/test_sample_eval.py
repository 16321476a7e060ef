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
