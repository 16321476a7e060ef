"""Mistakes a user can make before a run starts fail at once, in one line naming the file or
flag and the fix (not a traceback, not a silently different run): an unknown config variant, a
misspelt ``--config.key``, a read-only workdir, an empty dataset, a learning rate <= 0; and a run
stopped by non-finite steps says which steps, as metrics.jsonl counts them."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import base_256
from sdxl_jax.data import batching
from sdxl_jax.train import config as config_lib
from sdxl_jax.train import loop
from tests.train.runs import ROOT, config_with

STAGES = ("autoencoder", "base_256", "base_512", "base_1024", "dreambooth", "finetune", "lora",
          "refiner")  # fmt: skip


def trainer(*args: str, workdir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sdxl_jax.train", "--workdir", str(workdir), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("stage", STAGES)
def test_an_unknown_variant_fails_listing_the_known_ones(stage):
    module = importlib.import_module(f"experiments.{stage}")
    with pytest.raises(ValueError, match=rf"no variant 'tny'.*experiments/{stage}\.py:tiny"):
        module.get_config("tny")
    with pytest.raises(ValueError, match=rf"experiments/{stage}\.py \(full size\)"):
        config_lib.load(f"experiments/{stage}.py:tny")
    assert config_lib.load(f"experiments/{stage}.py:tiny").stage == stage


def test_the_cli_refuses_an_unknown_variant_and_a_misspelt_key_in_one_line(tmp_path):
    error = one_line_error(trainer("--config", "experiments/base_256.py:tny", workdir=tmp_path))
    assert "experiments/base_256.py has no variant 'tny'" in error
    assert "experiments/base_256.py:tiny" in error
    error = one_line_error(
        trainer("--config", "experiments/base_256.py:tiny", "--config.optim.lrr=1e-3",
                workdir=tmp_path)
    )  # fmt: skip
    assert error.startswith("error: --config.optim.lrr:") and "--config.optim.lr?" in error
    error = one_line_error(
        trainer("--config", "experiments/base_256.py", "--config.optimm.lr=1", workdir=tmp_path)
    )
    assert "--config.optimm.lr" in error and "did you mean --config.optim?" in error
    assert not any(tmp_path.iterdir())


def test_a_read_only_workdir_fails_in_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes through permissions: sysfs refuses even root
        workdir = Path("/sys/sdxl_jax_test_run")
    else:
        workdir = tmp_path / "ro"
        workdir.mkdir(mode=0o555)
    error = one_line_error(trainer("--config", "experiments/base_256.py:tiny", workdir=workdir))
    assert f"cannot write {workdir}/base_256" in error and "choose a --workdir" in error


def test_learning_rates_that_cannot_train_are_refused():
    for lr in (0.0, -1e-4, float("nan")):
        c = base_256.get_config("tiny")
        c.optim.lr = lr
        with pytest.raises(ValueError, match=r"optim.lr .*: need a learning rate > 0"):
            config_lib.validate(c, n_devices=8)


@pytest.mark.parametrize("kind", ["empty folder", "no records"])
def test_an_empty_dataset_fails_in_one_line_before_the_model_loads(tmp_path, monkeypatch, kind):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "no records":
        np.savez(data / batching.INDEX_FILE, key=np.array([], str), height=np.array([], int))
    monkeypatch.setattr(loop, "make_task", lambda *a: pytest.fail("the model was loaded"))
    c = base_256.get_config("tiny")
    c.data.path = str(data)
    with pytest.raises(ValueError) as e:
        loop.run_stage(c, tmp_path / "run", quiet=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"data.path {data}: ")
    assert ("holds no records" if kind == "no records" else "is not a prepared dataset") in message
    assert "python -m sdxl_jax.data.prepare" in message


@pytest.mark.slow(seconds=30)
def test_the_non_finite_stop_names_the_steps_metrics_jsonl_shows(parts, tmp_path):
    # lr 1e30: the first update is finite but enormous, every later step is skipped; three in
    # a row stop the run before its first checkpoint (every 100 steps).
    c = config_with(
        base_256, parts,
        **{"optim.lr": 1e30, "optim.warmup_steps": 0, "checkpoint.every_steps": 100},
    )  # fmt: skip
    c.max_bad_steps = 3
    with pytest.raises(loop.Diverged) as e:
        loop.run_stage(c, tmp_path, quiet=True)
    message = str(e.value)
    assert "3 non-finite steps in a row (steps 2-4)" in message
    assert "None" not in message and "no checkpoint was saved" in message
    rows = [
        json.loads(x) for x in (tmp_path / "base_256" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if r["train/skipped"]] == [2, 3, 4]
