"""The curriculum's evaluation: every synthetic caption sampled through ``generate()`` with base +
refiner, written as an image folder, and scored by the exact synthetic scorer through the
evaluation framework (``eval.json`` as ``sample --eval synthetic`` writes it)."""

import json

import numpy as np
from PIL import Image

from sdxl_jax.data import synthetic
from sdxl_jax.train import curriculum


def test_evaluation_samples_every_caption_and_scores_the_written_images(
    tiny_sdxl, tmp_path, monkeypatch
):
    base, refiner = tiny_sdxl
    # Fewer steps than the real evaluation; everything else as the curriculum runs it.
    monkeypatch.setitem(curriculum.EVAL, "steps", 2)
    monkeypatch.setitem(curriculum.EVAL, "images_per_caption", 1)
    result = curriculum.evaluate(tmp_path, base=base, refiner=refiner)

    captions = [
        synthetic.caption_for(c, s, p)
        for c in synthetic.COLOURS
        for s in synthetic.SHAPES
        for p in synthetic.POSITIONS
    ]
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert [r["prompt"] for r in manifest["images"]] == captions
    assert {r["refiner"] for r in manifest["images"]} == {str(refiner)}
    assert all(r["sampler"] == "ddim" and r["steps"] == 2 for r in manifest["images"])
    # The scores are those of the images on disk, scored independently of the run.
    images = [np.asarray(Image.open(tmp_path / "eval" / r["file"])) for r in
              manifest["images"]]  # fmt: skip
    assert images[0].shape == (curriculum.EVAL["size"], curriculum.EVAL["size"], 3)
    assert result["scores"] == synthetic.accuracy(images, captions)
    assert result["images"] == len(captions) == 72
    row = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"][0]
    assert {k: row[f"synthetic_{k}"] for k in result["scores"]} == result["scores"]
    assert row["guidance"] == curriculum.EVAL["guidance"]
