"""The train loop end to end on the tiny base stage: kill and resume, preemption, stage hand-off,
export, non-finite streaks, CLI errors.

Runs are real ``python -m sdxl_jax.train`` processes (SIGKILL and SIGTERM are real signals) on a
real prepared synthetic dataset, with the frozen tiny text encoders and a random tiny VAE. A
shared persistent compilation cache keeps the repeated launches from recompiling.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments import base_256, base_1024
from sdxl_jax import sharding
from sdxl_jax.train import loop
from sdxl_jax.train.diffusion_task import DiffusionTask
from tests.train.runs import ROOT, STEPS, config_with, finish, launch, losses


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(parts, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    (workdir / "terminal.txt").write_text(finish(launch(parts, workdir)))
    return workdir


def test_the_terminal_is_quiet_by_default(uninterrupted):
    """What a default run prints (stdout and stderr): its own lines, no absl / orbax / JAX
    INFO logging (warnings stay: orbax's "waiting for previous save" on a busy machine)."""
    lines = (uninterrupted / "terminal.txt").read_text().splitlines()
    noise = [x for x in lines if re.match(r"I\d{4} |INFO:|DEBUG:", x)]
    assert not noise, noise[:5]
    assert any(x.startswith("[base_256] step") for x in lines)
    assert len(lines) < 40, lines


@pytest.mark.slow(seconds=150)
def test_sigkill_and_sigterm_resume_with_the_same_losses(parts, uninterrupted, tmp_path):
    reference = losses(uninterrupted)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # SIGKILL once the step-10 checkpoint is complete (orbax renames its folder when done):
    # whatever was in flight after it is lost, the rerun starts at 10.
    proc = launch(parts, tmp_path)
    ckpt10 = tmp_path / "base_256" / "checkpoints" / "10"
    wait_for(ckpt10.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # SIGTERM (preemption) once the resumed run logs step 14: it saves at a step boundary and
    # exits 0.
    # (The killed run may have logged steps past 10: count the resumed run's own lines.)
    metrics = tmp_path / "base_256" / "metrics.jsonl"
    logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    proc = launch(parts, tmp_path)
    wait_for(lambda: len(metrics.read_text().splitlines()) >= logged + 4, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "resumed from step 10" in out
    assert "preempted at step" in out
    saved = max(int(p.name) for p in (tmp_path / "base_256" / "checkpoints").iterdir()
                if p.name.isdigit())  # fmt: skip
    assert saved >= 14
    assert saved < STEPS  # (else the test proves nothing: make STEPS larger)

    out = finish(launch(parts, tmp_path))
    assert f"resumed from step {saved}" in out
    resumed = losses(tmp_path)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose(
        [resumed[s] for s in sorted(reference)], [reference[s] for s in sorted(reference)],
        rtol=1e-6,
    )  # fmt: skip
    # The final EMA weights, what the next stage starts from, agree too.
    restore = ocp.StandardCheckpointer().restore
    a = restore((uninterrupted / "base_256" / "final_ema").absolute())
    b = restore((tmp_path / "base_256" / "final_ema").absolute())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


@pytest.mark.slow(seconds=20)
def test_stage_hand_off_starts_from_the_previous_stage_ema(parts, uninterrupted):
    # The final checkpoint's EMA (read back by orbax alone) is what base_1024 starts from,
    # not its raw params.
    last = uninterrupted / "base_256" / "checkpoints" / str(STEPS) / "state"
    saved = ocp.StandardCheckpointer().restore(last.absolute())
    c = config_with(base_1024, parts, init_from="base_256")
    mesh = sharding.make_mesh(dict(c.mesh))
    task = DiffusionTask(c, mesh, uninterrupted)
    params = task.init_state().params
    ema = jax.tree.leaves(saved["ema"])
    raw = jax.tree.leaves(saved["params"])
    got = jax.tree.leaves(params)
    assert len(got) == len(ema)
    for g, e in zip(got, ema, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
    assert any(
        not np.array_equal(np.asarray(e), np.asarray(r)) for e, r in zip(ema, raw, strict=True)
    )


@pytest.mark.slow(seconds=20)
def test_export_opens_in_diffusers_and_matches_the_ema_unet(uninterrupted):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdxl_jax.weights import formats

    export = uninterrupted / "base_256" / "export"
    pipe = StableDiffusionXLPipeline.from_pretrained(export)
    ours = formats.load(export, ["unet"])["unet"]
    ema = ocp.StandardCheckpointer().restore((uninterrupted / "base_256" / "final_ema").absolute())
    flat = dict(nnx.to_flat_state(nnx.state(ours)))
    kernel = flat[("conv_in", "kernel")].get_value()
    saved = ema["conv_in"]["kernel"]
    saved = saved["value"] if isinstance(saved, dict) else saved  # how orbax stores a Variable
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(saved))
    # diffusers holds the same weight (OIHW vs our HWIO).
    theirs = pipe.unet.conv_in.weight.detach().numpy()
    np.testing.assert_allclose(theirs.transpose(2, 3, 1, 0), np.asarray(kernel), atol=0)
    assert isinstance(pipe.unet.conv_in.weight, torch.nn.Parameter)


@pytest.mark.slow(seconds=20)
def test_training_previews_sample_what_the_export_samples(parts, uninterrupted):
    """A preview of the final EMA weights (DDIM, trailing steps, zeroed negative text) equals
    ``generate()`` on the exported folder with those settings: the weights, schedule and
    conditioning reach the export as the trainer used them."""
    from sdxl_jax.inference import generate

    c = config_with(base_256, parts, init_from="base_256")  # the task starts from its final EMA
    task = DiffusionTask(c, sharding.make_mesh(dict(c.mesh)), uninterrupted)
    prompts = ["a red circle in the top left", "a blue square in the bottom right"]
    preview = task.sample(task.init_state().params, prompts, size=(32, 32), steps=4, seed=3)
    export = uninterrupted / "base_256" / "export"
    got = generate.generate(
        prompts, export, sampler="ddim", spacing="trailing", steps=4, guidance=4.0,
        height=32, width=32, seed=3,
    )  # fmt: skip
    diff = np.abs(preview.astype(int) - got.images.astype(int))
    assert preview.std() > 5  # not a blank picture
    assert diff.max() <= 1 and diff.mean() < 0.05


@pytest.mark.slow(seconds=20)
def test_a_run_of_non_finite_steps_stops_without_checkpointing_it(parts, tmp_path):
    # lr 1e30: the first update is finite but enormous, every later loss overflows, so every
    # later step is skipped; three in a row stop the run.
    c = config_with(
        base_256, parts, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "checkpoint.every_steps": 1}
    )
    c.max_bad_steps = 3
    with pytest.raises(loop.Diverged, match="3 non-finite steps in a row"):
        loop.run_stage(c, tmp_path, quiet=True)
    steps = sorted(int(p.name) for p in (tmp_path / "base_256" / "checkpoints").iterdir()
                   if p.name.isdigit())  # fmt: skip
    assert steps == [1]  # saved after the one applied update, none during the streak
    assert not (tmp_path / "base_256" / "final_ema").exists()


def test_misspelt_config_key_fails_before_anything_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sdxl_jax.train", "--config", "experiments/base_256.py:tiny",
           "--workdir", str(tmp_path), "--config.optim.lrr=1e-3"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "lrr" in out.stderr
    assert not any(tmp_path.iterdir())


def test_full_size_config_without_data_fails_with_the_fix(tmp_path):
    c = base_256.get_config("")
    with pytest.raises(ValueError, match="python -m sdxl_jax.data.prepare"):
        loop.run_stage(c, tmp_path, quiet=True)
