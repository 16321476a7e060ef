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


def test_the_curriculum_asks_for_two_cpu_devices_unless_told(monkeypatch):
    monkeypatch.setattr(curriculum.os, "cpu_count", lambda: 2)
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert curriculum.use_cpu_cores(env) == 2
    assert env["XLA_FLAGS"].split() == [
        "--xla_cpu_enable_fast_math=false",
        "--xla_force_host_platform_device_count=2",
    ]
    given = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert curriculum.use_cpu_cores(given) is None
    assert given == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    monkeypatch.setattr(curriculum.os, "cpu_count", lambda: 1)
    assert curriculum.use_cpu_cores({}) is None


def test_the_flag_is_set_before_jax_starts_its_backend():
    """``python -m sdxl_jax.train`` imports the trainer's modules before main() sets the flag:
    none of them may start JAX's backend, or the flag would come too late."""
    import os
    import subprocess
    import sys

    code = (
        "import sdxl_jax.train.__main__\n"
        "from sdxl_jax.train import curriculum\n"
        "curriculum.os.cpu_count = lambda: 2\n"
        "curriculum.use_cpu_cores()\n"
        "import jax\n"
        "print(jax.device_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"
