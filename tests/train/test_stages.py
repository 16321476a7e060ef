"""Every stage config's tiny variant runs, in curriculum order, each starting from the previous
stage's result: autoencoder -> base_256 -> base_512 -> base_1024 -> refiner, and finetune, lora
and dreambooth.

A few steps each on a small synthetic dataset; what is checked is that each stage trains (finite
losses, its checkpoint, final EMA and export exist) and hands its weights on. Numerical
correctness of the step and the loop is tested in test_step.py and test_loop.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import (
    autoencoder,
    base_256,
    base_512,
    base_1024,
    dreambooth,
    finetune,
    lora,
    refiner,
)
from sdxl_jax.data import batching, images
from sdxl_jax.inference import checkpoints, generate
from sdxl_jax.train import dreambooth as dreambooth_lib
from sdxl_jax.train import loop
from tests.data.fixtures import prepared_dataset

STAGES = (autoencoder, base_256, base_512, base_1024, refiner, finetune, lora, dreambooth)


def shorten(c, data) -> None:
    c.data.path = str(data)
    c.data.global_batch_size = 8
    c.optim.total_steps = 2
    c.optim.warmup_steps = 1
    c.checkpoint.every_steps = 1
    c.log.every_steps = 1
    if "sample_every_steps" in c.log:
        c.log.sample_every_steps = 0
    if c.kind == "diffusion":  # the test-size UNet: same code, half the compile time
        c.model.preset = c.model.preset.replace("tiny", "micro")


def shorten_dreambooth(c) -> None:
    c.data.path = ""  # the stage prepares its own
    c.dreambooth.instance_data = "synthetic:3?seed=5&colour=purple&word=blorp"
    c.dreambooth.num_class_images = 4
    c.dreambooth.class_prompt = "a red circle in the top left"
    c.dreambooth.prior_loss_weight = 0.5
    c.dreambooth.class_steps = 3
    c.dreambooth.class_guidance = 7.0


def check_dreambooth_data(c, workdir) -> None:
    """Class images as generate() makes them, the dataset's repeats and weights, the cache."""
    stage = workdir / c.stage
    folder = stage / dreambooth_lib.CLASS_FOLDER
    files = sorted(folder.glob("*.png"))
    assert len(files) == 4
    assert {p.with_suffix(".txt").read_text() for p in files} == {c.dreambooth.class_prompt}
    # The base's own samples of the class prompt (one chunk: seeds from class_seed 0).
    want = generate.generate(
        [c.dreambooth.class_prompt] * 4, workdir / "base_1024" / "export", steps=3,
        guidance=7.0, height=64, width=64, seed=0, batch_size=4,
    ).images  # fmt: skip
    got = np.stack([images.decode_rgb(p.read_bytes()) for p in files])
    assert np.abs(got.astype(int) - want).max() <= 1
    index = batching.load_index(stage / dreambooth_lib.DATA_FOLDER)
    # 3 instance images x round(4 / 3) = 1 use each, then the 4 class images at weight 0.5.
    assert index["repeats"].tolist() == [1] * 7
    np.testing.assert_array_equal(index["loss_weight"], np.float32([1] * 3 + [0.5] * 4))
    # Rerun: nothing is generated again; two more are generated on their own.
    stamps = [p.stat().st_mtime_ns for p in files]
    c.dreambooth.num_class_images = 6
    init = workdir / "base_1024" / "export"
    dreambooth_lib.prepare_data(c, workdir, init, say=lambda *a: None)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert len(list(folder.glob("*.png"))) == 6
    index = batching.load_index(stage / dreambooth_lib.DATA_FOLDER)
    assert index["repeats"].tolist() == [2] * 3 + [1] * 6  # round(6 / 3)


@pytest.mark.slow(seconds=200)
def test_tiny_variants_of_every_stage_run_in_curriculum_order(tmp_path):
    data, _ = prepared_dataset(
        tmp_path / "data", 64, ("tiny_square_32", "tiny_square_64", "tiny_aspect_64")
    )
    workdir = tmp_path / "run"
    for module in STAGES:
        c = module.get_config("tiny")
        shorten(c, data)
        if c.stage == "autoencoder":
            c.ae.scale_images = 16
        if c.stage == "refiner":
            c.init_from = "base_1024"  # as the tiny curriculum: the refiner from the base
        if c.stage == "dreambooth":
            shorten_dreambooth(c)
        result = loop.run_stage(c, workdir, quiet=True)
        assert result.status == "finished", c.stage
        stage = workdir / c.stage
        assert (stage / "final_ema").is_dir() and (stage / "checkpoints" / "2").is_dir()
        rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert all(np.isfinite(r["train/loss"]) for r in rows), c.stage
        if c.get("lora") is not None:  # the adapters as kohya and diffusers/PEFT files
            names = sorted(p.name for p in result.export.iterdir())
            assert names == ["lora.safetensors", "pytorch_lora_weights.safetensors"]
        elif c.kind == "diffusion":
            info = checkpoints.check_stage(result.export)  # a complete, loadable pipeline folder
            assert info.role == ("refiner" if c.stage == "refiner" else "base")
        if c.stage == "dreambooth":
            check_dreambooth_data(c, workdir)
    # On demand: checkpoint 2 exports the files the stage's end wrote; checkpoint 1 others.
    c = lora.get_config("tiny")
    shorten(c, data)
    end = load_file(workdir / "lora" / "export" / "lora.safetensors")
    for step in (2, 1):
        out = loop.export_checkpoint(c, workdir, step, tmp_path / f"lora_step{step}")
        got = load_file(out / "lora.safetensors")
        assert got.keys() == end.keys() and (out / "pytorch_lora_weights.safetensors").exists()
        same = all(np.array_equal(got[k], end[k]) for k in end)
        assert same is (step == 2), step
    with pytest.raises(ValueError, match=r"no checkpoint at step 7; there are \[1, 2\]"):
        loop.export_checkpoint(c, workdir, 7)
    # Rerunning a finished stage does nothing.
    c = base_256.get_config("tiny")
    shorten(c, data)
    assert loop.run_stage(c, workdir, quiet=True).status == "already finished"
