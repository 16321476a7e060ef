"""Every stage config's tiny variant runs, in curriculum order, each starting from the previous
stage's result: autoencoder -> base_256 -> base_512 -> base_1024 -> refiner, and finetune and lora.

A few steps each on a small synthetic dataset; what is checked is that each stage trains (finite
losses, its checkpoint, final EMA and export exist) and hands its weights on. Numerical
correctness of the step and the loop is tested in test_step.py and test_loop.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import autoencoder, base_256, base_512, base_1024, finetune, lora, refiner
from sdxl_jax.inference import checkpoints
from sdxl_jax.train import loop
from tests.data.fixtures import prepared_dataset

STAGES = (autoencoder, base_256, base_512, base_1024, refiner, finetune, lora)


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


@pytest.mark.slow(seconds=165)
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
    # Rerunning a finished stage does nothing.
    c = base_256.get_config("tiny")
    shorten(c, data)
    assert loop.run_stage(c, workdir, quiet=True).status == "already finished"
