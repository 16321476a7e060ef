"""A gs:// workdir, on the local GCS server of tests/gcs.py through the real clients (orbax's
arrays through tensorstore, the rest through gcsfs): checkpoints go to the bucket, logs and
exports are uploaded, and a fresh host (a new VM after a preemption) resumes from the bucket
alone. The frozen encoders, the VAE, the latent cache and the last stage's dataset come from
gs:// URLs too (fetched, or read in place)."""

from __future__ import annotations

import json

import pytest
from etils import epath

from experiments import base_256, base_1024
from sdxl_jax.train import loop
from sdxl_jax.workdir import Workdir
from tests import gcs
from tests.train.runs import config_with


def logged_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow(seconds=85)
def test_a_fresh_host_resumes_from_the_bucket(parts, gcs_bucket, monkeypatch, tmp_path):
    bucket = epath.Path(f"{gcs_bucket}/{tmp_path.name}/run")
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "fetched"))
    gs = {k: str(gcs.upload(parts[k], f"{gcs_bucket}/{tmp_path.name}/{k}"))
          for k in ("frozen", "vae", "data", "latents")}  # fmt: skip
    remote_models = {"model.checkpoint": gs["frozen"], "model.vae": gs["vae"]}
    c = config_with(base_256, parts, **{"optim.total_steps": 6, "checkpoint.every_steps": 3},
                    **remote_models, **{"data.cache": gs["latents"]})  # fmt: skip

    first = loop.run_stage(c, Workdir(str(bucket), local=tmp_path / "host1"), stop_at_step=3,
                           quiet=True)  # fmt: skip
    assert first.status == "stopped"
    assert (bucket / "base_256" / "checkpoints" / "3").is_dir()
    assert not (tmp_path / "host1" / "base_256" / "checkpoints").exists()  # only in the bucket
    assert logged_steps(bucket / "base_256" / "metrics.jsonl") == [1, 2, 3]  # uploaded
    fetched = tmp_path / "fetched" / "gs" / gs["frozen"].removeprefix("gs://")
    assert (fetched / "text_encoder_2" / "config.json").exists()

    # host1 is gone; host2 starts empty and finishes the stage from the bucket
    second = loop.run_stage(c, Workdir(str(bucket), local=tmp_path / "host2"), quiet=True)
    assert second.status == "finished" and second.step == 6
    assert logged_steps(bucket / "base_256" / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert (bucket / "base_256" / "export" / "unet" / "config.json").exists()
    assert (bucket / "base_256" / "final_ema").is_dir()
    assert json.loads((bucket / "base_256" / "summary.json").read_text())["step"] == 6

    # the next stage, on a third host, starts from base_256's final EMA fetched from the bucket
    extra = {"optim.total_steps": 1, "optim.warmup_steps": 0, "data.cache": "auto",
             "data.path": gs["data"], **remote_models}  # fmt: skip
    c2 = config_with(base_1024, parts, init_from="base_256", **extra)
    third = loop.run_stage(c2, Workdir(str(bucket), local=tmp_path / "host3"), quiet=True)
    assert third.status == "finished"
    assert (tmp_path / "host3" / "base_256" / "final_ema").is_dir()
    assert (bucket / "base_1024" / "export" / "unet" / "config.json").exists()
