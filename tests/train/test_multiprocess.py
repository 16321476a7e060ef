"""Multi-host training for real: 2 processes x 2 CPU devices, coordinated by jax.distributed
with gloo collectives (started by launch/local.sh as a user would) and writing to a gs://
workdir (the local GCS server of tests/gcs.py), against 1 process x 4 devices running the same
config on a local folder.

- the losses of every step are equal;
- each process read a disjoint slice of every global batch, together the whole batch, and
  both used the same bucket at every step (``log.trace_data``);
- process 1 compiling its first step 40 s later than process 0 (a slower host) is waited
  for: gloo alone gives a late peer 30 s;
- only process 0 wrote TensorBoard, metrics and the export (the gather for it is collective);
- the 2-process checkpoint of step 4, copied to another place in the bucket, restores in 1
  process on a fresh host (empty local disk) and another mesh shape (fsdp=2 over 2 devices),
  and training continues with the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from etils import epath

from tests import gcs
from tests.train.runs import finish, launch, launch_local, losses

STEPS = 8
SETTINGS = {"optim.total_steps": STEPS, "checkpoint.every_steps": 4, "log.trace_data": True,
            "data.global_batch_size": 8, "mesh.data": -1}  # fmt: skip


def trace(workdir: Path, process: int) -> dict[int, dict]:
    path = workdir / "base_256" / "data_trace" / f"process_{process}.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow(seconds=170)
def test_two_processes_train_like_one_and_their_checkpoint_continues_in_one(
    parts, gcs_bucket, monkeypatch, tmp_path
):
    # One test (not two sharing a fixture): pytest-xdist would run the fixture on each worker.
    one = tmp_path / "one_process"
    two = epath.Path(f"{gcs_bucket}/{tmp_path.name}/two_processes")
    finish(launch(parts, one, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                  **SETTINGS))  # fmt: skip
    # process 1 compiles its first step 40 s late (tests/train/slow_peer.py)
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "pod_disk"))
    finish(launch_local(parts, str(two), processes=2, devices=2, module="tests.train.slow_peer",
                        log_dir=tmp_path / "logs", **SETTINGS))  # fmt: skip
    ref, got = losses(one), losses(two)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=2e-5)
    assert len(set(ref.values())) == STEPS  # the losses differ from step to step

    pod_disk = tmp_path / "pod_disk" / "gs" / str(two).removeprefix("gs://")
    single, hosts = trace(one, 0), [trace(pod_disk, p) for p in (0, 1)]
    assert sorted(single) == list(range(STEPS))
    buckets = set()
    for step, whole in single.items():
        a, b = hosts[0][step], hosts[1][step]
        assert a["bucket"] == b["bucket"] == whole["bucket"], step
        assert not set(a["index"]) & set(b["index"]), step  # disjoint
        assert a["index"] + b["index"] == whole["index"], step  # together: the global batch
        assert len(a["index"]) == len(b["index"]) == 4
        buckets.add(tuple(whole["bucket"]))
    assert buckets == {(32, 32)}

    # who wrote what
    logs = {p: (tmp_path / "logs" / f"process_{p}.log").read_text() for p in (0, 1)}
    assert "process 0/2" in logs[0] and "process 1/2" in logs[1]
    assert "checkpoint shards only" in logs[1]
    assert len(list((two / "base_256" / "tb").glob("events.out.tfevents.*"))) == 1
    assert (two / "base_256" / "export" / "unet" / "config.json").exists()
    assert (two / "base_256" / "checkpoints" / "8").is_dir()
    assert not (pod_disk / "base_256" / "checkpoints").exists()  # in the bucket only
    assert not (pod_disk / "base_256" / "data_trace" / "process_2.jsonl").exists()

    # the 2-process run as it was at step 4 (its checkpoint of step 4, nothing after), resumed
    # by one process on a fresh host
    work = epath.Path(f"{gcs_bucket}/{tmp_path.name}/resume")
    later = ("data_trace", "checkpoints/8", "final_ema", "export", "summary.json")
    gcs.copy_tree(two, work, skip=tuple(f"base_256/{p}" for p in later))
    stage = work / "base_256"
    assert [p.name for p in (stage / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "fresh_disk"))
    out = finish(
        launch(
            parts,
            str(work),
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
            **{**SETTINGS, "mesh.data": 1, "mesh.fsdp": -1},
        )  # fmt: skip
    )
    assert "resumed from step 4" in out and "fsdp=2" in out
    ref, got = losses(one), losses(work)
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [ref[s] for s in range(5, 9)],
                               rtol=2e-5)  # fmt: skip
