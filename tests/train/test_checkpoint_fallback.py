"""A damaged checkpoint does not stop a run: a truncated or zeroed data file, or a deleted
``state/``, in the newest checkpoint makes restore fall back to the next older one, which is
moved aside (never deleted) with a one-line warning; only when none restores does it fail, in
one message. A damaged ``final_ema/`` is replaced by the EMA of the stage's last checkpoint (the
same weights), for the next stage's ``init_from`` too.

Data that orbax reads without an error but that differs from what was saved (part of a file
zeroed can read back as other numbers; here: another step's data in its place) is caught by the
digest saved with each checkpoint. The library cases use three checkpoints of distinct random
states saved once per module; the end-to-end cases rerun the real trainer on one tiny run shared
by the module (copied per case).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import base_1024
from sdxl_jax import checkpoint as ck
from sdxl_jax import sharding as sh
from sdxl_jax.train import lock as lock_lib
from tests.test_checkpoint import abstract_state, random_state
from tests.train.runs import config_with, finish, launch, losses

# orbax's failed reads leave an asyncio callback behind
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
FINAL = {"stage": "s", "config": {"optim": {"total_steps": 3, "accumulate": 1}}}


def damage(folder, how: str, other=None) -> None:
    """Damage an orbax item folder (``<step>/state`` or ``final_ema``) as a disk or a person
    might: its data files (under ``d/`` folders) cut to half or zeroed, the folder deleted, or
    its data replaced by that of ``other`` (a copy gone wrong: orbax reads it without error)."""
    if how in ("deleted", "swapped"):
        shutil.rmtree(folder)
        if how == "swapped":
            shutil.copytree(other, folder)
        return
    for f in [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]:
        n = f.stat().st_size
        f.write_bytes(f.read_bytes()[: n // 2] if how == "truncated" else bytes(n))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(stage folder with checkpoints 1, 2, 3 and final_ema, {step: state on the host})."""
    stage = tmp_path_factory.mktemp("saved") / "s"
    mesh = sh.make_mesh({"fsdp": 8})
    ckpts = ck.StageCheckpoints(stage)
    states = {}
    for step in (1, 2, 3):
        state = random_state(mesh, seed=step)
        ckpts.save(step, state, {"step": step}, FINAL)
        states[step] = jax.device_get(state)
    ckpts.save_final_ema(state.ema)
    ckpts.close()
    # step 2's EMA saved as a final_ema is: a swap that orbax reads without error
    other = ck.StageCheckpoints(stage.parent / "other").save_final_ema(states[2].ema)
    shutil.copy(stage / ck.FINAL_EMA / ck.DIGEST_FILE, other / ck.DIGEST_FILE)
    return stage, states


def copy(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "s")


def target(mesh=None):
    params_abs, state_abs = abstract_state()
    mesh = mesh or sh.make_mesh({"fsdp": 8})
    return (
        ck.abstract_like(params_abs, sh.tree_shardings(params_abs, mesh)),
        ck.abstract_like(state_abs, sh.tree_shardings(state_abs, mesh)),
    )


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "deleted", "swapped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_next(saved, tmp_path, how):
    stage = copy(saved, tmp_path)
    ckpt = stage / "checkpoints"
    damage(ckpt / "3" / "state", how, other=ckpt / "1" / "state")
    ckpts = ck.StageCheckpoints(stage)
    warnings = []
    state, data, meta, step = ckpts.restore_newest(target()[1], warn=warnings.append)
    assert (step, data, meta) == (2, {"step": 2}, FINAL)
    assert_same(state, saved[1][2])
    # One line naming the damaged step; the checkpoint moved aside, not deleted.
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "checkpoint step 3" in warnings[0] and "resuming from step 2" in warnings[0]
    if how == "swapped":  # orbax reads it: the digest saved with the checkpoint tells
        assert "digest mismatch" in warnings[0]
    moved = list((stage / "damaged").iterdir())
    assert [p.name.startswith("checkpoint-3-") for p in moved] == [True]
    assert str(moved[0]) in warnings[0] and (moved[0] / "data").is_dir()
    # The run goes on: step 3 is saved again.
    assert ckpts.latest_step() == 2 and ckpts.manager.all_steps() == [1, 2]
    assert ckpts.save(3, state, {"step": 3}, FINAL)
    ckpts.close()


def test_when_no_checkpoint_restores_the_error_lists_each_and_moves_none(saved, tmp_path):
    stage = copy(saved, tmp_path)
    ckpt = stage / "checkpoints"
    for step, how in ((3, "swapped"), (2, "truncated"), (1, "deleted")):
        damage(ckpt / str(step) / "state", how, other=ckpt / "2" / "state")
    ckpts = ck.StageCheckpoints(stage)
    with pytest.raises(ck.CheckpointError) as e:
        ckpts.restore_newest(target()[1], warn=pytest.fail)
    message = str(e.value)
    assert "\n" not in message and "no checkpoint under" in message
    assert all(f"step {s}:" in message for s in (1, 2, 3)) and "digest mismatch" in message
    assert ckpts.manager.all_steps() == [1, 2, 3] and not (stage / "damaged").exists()
    ckpts.close()


def test_the_digest_is_the_same_on_another_mesh(saved, tmp_path):
    """Restored onto data=2 x fsdp=4, the digest saved on fsdp=8 still matches."""
    stage = copy(saved, tmp_path)
    ckpts = ck.StageCheckpoints(stage)
    mesh = sh.make_mesh({"data": 2, "fsdp": 4})
    state, _, _ = ckpts.restore(target(mesh)[1], 3)
    assert_same(state, saved[1][3])
    ckpts.close()


@pytest.mark.parametrize("how", ["truncated", "zeroed", "deleted", "swapped"])
def test_a_damaged_final_ema_falls_back_to_the_last_checkpoint(saved, tmp_path, how, capsys):
    stage = copy(saved, tmp_path)
    damage(stage / ck.FINAL_EMA, how, other=saved[0].parent / "other" / ck.FINAL_EMA)
    ema = ck.load_final_ema(stage, target()[0])
    assert_same(ema, saved[1][3].ema)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint step 3" in err[0], err
    if how == "swapped":
        assert "digest mismatch" in err[0]
    if how != "deleted":
        assert "is damaged" in err[0] and not (stage / ck.FINAL_EMA).exists()
        assert [p.name.startswith("final_ema-") for p in (stage / "damaged").iterdir()] == [True]


def test_a_final_ema_without_a_final_checkpoint_to_fall_back_on(saved, tmp_path):
    stage = copy(saved, tmp_path)
    damage(stage / ck.FINAL_EMA, "zeroed")
    shutil.rmtree(stage / "checkpoints" / "3")  # the last one is not the final step
    with pytest.raises(ck.CheckpointError, match="is damaged .* rerun that stage"):
        ck.load_final_ema(stage, target()[0])
    assert (stage / ck.FINAL_EMA).exists()  # nothing to replace it: left where it is
    shutil.rmtree(stage / ck.FINAL_EMA)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        ck.load_final_ema(stage, target()[0])


# -- the trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(parts, tmp_path_factory):
    """A tiny base_256 run of 8 steps stopped at step 6: checkpoints 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("stopped")
    flags = ["--stop_at_step", "6"]
    finish(launch(parts, workdir, flags=flags, **RUN))
    return workdir


RUN = {"optim.total_steps": 8, "checkpoint.every_steps": 2}


@pytest.fixture(scope="module")
def rerun(parts, stopped, tmp_path_factory):
    """What a crash may leave, rerun: a damaged newest checkpoint (its data files zeroed) and
    the dead run's lock. (workdir, the rerun's output)."""
    workdir = tmp_path_factory.mktemp("rerun") / "run"
    shutil.copytree(stopped, workdir)
    stage = workdir / "base_256"
    damage(stage / "checkpoints" / "6" / "state", "zeroed")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {**json.loads(lock_lib.StageLock(workdir, "base_256").record()), "pid": dead.pid}
    (stage / lock_lib.LOCK_FILE).write_text(json.dumps(record))
    return workdir, finish(launch(parts, workdir, **RUN))


@pytest.mark.slow(seconds=60)
def test_the_rerun_resumes_from_the_checkpoint_before_the_damaged_one(rerun):
    workdir, out = rerun
    lines = out.splitlines()
    damaged = [x for x in lines if "is damaged" in x]
    assert len(damaged) == 1 and "checkpoint step 6" in damaged[0], out[-3000:]
    assert any("took over the lock" in x and "no longer running" in x for x in lines)
    assert "resumed from step 4" in out and "done: 8 steps" in out
    stage = workdir / "base_256"
    assert [p.name[:13] for p in (stage / "damaged").iterdir()] == ["checkpoint-6-"]
    assert sorted(int(p.name) for p in (stage / "checkpoints").iterdir()) == [4, 6, 8]
    assert all(np.isfinite(v) for v in losses(workdir).values())
    assert not (stage / lock_lib.LOCK_FILE).exists()  # released at the end


@pytest.mark.slow(seconds=30)
def test_init_from_a_stage_whose_final_ema_is_damaged(parts, rerun, tmp_path, capsys):
    from sdxl_jax.train.diffusion_task import DiffusionTask

    workdir = shutil.copytree(rerun[0], tmp_path / "run")
    damage(workdir / "base_256" / ck.FINAL_EMA, "truncated")
    c = config_with(base_1024, parts, init_from="base_256")
    task = DiffusionTask(c, sh.make_mesh(dict(c.mesh)), workdir)
    params = task.init_state().params
    last = workdir / "base_256" / "checkpoints" / "8" / "state"
    assert_same(params, ocp.StandardCheckpointer().restore(last.absolute())["ema"])
    err = capsys.readouterr().err
    assert "final_ema is damaged" in err and "checkpoint step 8" in err
