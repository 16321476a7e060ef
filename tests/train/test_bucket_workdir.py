"""A bucket workdir (gs://... in real use; here a second local folder reached through
etils.epath, as the bucket would be): checkpoints go to the bucket, logs and exports are
uploaded, and a fresh host (a new VM after a preemption) resumes from the bucket alone."""

from __future__ import annotations

import json

import pytest

from experiments import base_256, base_1024
from sdxl_jax.train import loop
from sdxl_jax.workdir import Workdir
from tests.train.runs import config_with


def logged_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_fresh_host_resumes_from_the_bucket(parts, tmp_path):
    bucket = tmp_path / "bucket"
    c = config_with(base_256, parts, **{"optim.total_steps": 6, "checkpoint.every_steps": 3})

    first = loop.run_stage(c, Workdir(bucket, local=tmp_path / "host1"), stop_at_step=3,
                           quiet=True)  # fmt: skip
    assert first.status == "stopped"
    assert (bucket / "base_256" / "checkpoints" / "3").is_dir()
    assert not (tmp_path / "host1" / "base_256" / "checkpoints").exists()  # only in the bucket
    assert logged_steps(bucket / "base_256" / "metrics.jsonl") == [1, 2, 3]  # uploaded

    # host1 is gone; host2 starts empty and finishes the stage from the bucket
    second = loop.run_stage(c, Workdir(bucket, local=tmp_path / "host2"), quiet=True)
    assert second.status == "finished" and second.step == 6
    assert logged_steps(bucket / "base_256" / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert (bucket / "base_256" / "export" / "unet" / "config.json").exists()
    assert (bucket / "base_256" / "final_ema").is_dir()
    assert json.loads((bucket / "base_256" / "summary.json").read_text())["step"] == 6

    # the next stage, on a third host, starts from base_256's final EMA fetched from the bucket
    extra = {"optim.total_steps": 1, "optim.warmup_steps": 0, "data.cache": "auto"}
    c2 = config_with(base_1024, parts, init_from="base_256", **extra)
    third = loop.run_stage(c2, Workdir(bucket, local=tmp_path / "host3"), quiet=True)
    assert third.status == "finished"
    assert (tmp_path / "host3" / "base_256" / "final_ema").is_dir()
    assert (bucket / "base_1024" / "export" / "unet" / "config.json").exists()
