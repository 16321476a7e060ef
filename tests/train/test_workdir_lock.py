"""One run per stage: a second trainer on a stage is refused at once, naming the run that holds
it; a dead run's lock (same host and its pid gone, or no heartbeat for LOCK_STALE_S) is taken
over; in a bucket (gs://, the local GCS server of tests/gcs.py) too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from sdxl_jax.train import lock as lock_lib
from tests.train.runs import ROOT

LOCK = lock_lib.LOCK_FILE


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(path, **fields) -> None:
    """A lock file as another run would have written it."""
    record = json.loads(lock_lib.StageLock(path.parent.parent, path.parent.name).record())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "token": "theirs", **fields}))


def test_a_second_trainer_is_refused_at_once_naming_the_holder(tmp_path):
    holder = lock_lib.StageLock(tmp_path, "base_256").acquire()
    try:
        cmd = [sys.executable, "-m", "sdxl_jax.train", "--config",
               "experiments/base_256.py:tiny", "--workdir", str(tmp_path)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.monotonic()
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - t0
    finally:
        holder.release()
    assert out.returncode == 2, out.stderr[-2000:]
    error = out.stderr.strip().splitlines()
    assert len(error) == 1, out.stderr[-2000:]
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in error[0]
    assert seconds < 60  # refused before anything loads (not orbax's 5-minute wait)
    written = {p.name for p in (tmp_path / "base_256").iterdir()}
    assert not written & {"config.json", "metrics.jsonl", "checkpoints"}, written


def test_the_lock_names_its_holder_and_is_removed_on_release(tmp_path):
    lock = lock_lib.StageLock(tmp_path, "s").acquire()
    record = json.loads((tmp_path / "s" / LOCK).read_text())
    assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
    assert time.strptime(record["started"], "%Y-%m-%d %H:%M:%S UTC")
    with pytest.raises(lock_lib.WorkdirInUse, match=f"in use by pid {os.getpid()}"):
        lock_lib.StageLock(tmp_path, "s").acquire()  # this very process holds it
    lock.release()
    assert not (tmp_path / "s" / LOCK).exists()
    lock_lib.StageLock(tmp_path, "s").acquire().release()  # free again


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path):
    plant(tmp_path / "s" / LOCK, pid=dead_pid(), pid_start=None)
    said = []
    lock = lock_lib.StageLock(tmp_path, "s", warn=said.append).acquire()
    assert len(said) == 1 and "took over the lock" in said[0] and "no longer running" in said[0]
    assert json.loads((tmp_path / "s" / LOCK).read_text())["token"] == lock.token
    lock.release()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """Our own pid, but started at another time: the run that wrote the lock is gone."""
    plant(tmp_path / "s" / LOCK, pid_start="1")
    said = []
    lock = lock_lib.StageLock(tmp_path, "s", warn=said.append).acquire()
    assert json.loads((tmp_path / "s" / LOCK).read_text())["token"] == lock.token  # now ours
    assert len(said) == 1 and "took over the lock" in said[0]
    lock.release()


def test_another_hosts_lock_holds_until_its_heartbeat_stops(tmp_path, monkeypatch):
    plant(tmp_path / "s" / LOCK, host="elsewhere", pid=1)
    with pytest.raises(lock_lib.WorkdirInUse, match="on host elsewhere"):
        lock_lib.StageLock(tmp_path, "s").acquire()
    monkeypatch.setattr(lock_lib, "LOCK_STALE_S", 0.0)
    time.sleep(0.01)
    said = []
    lock_lib.StageLock(tmp_path, "s", warn=said.append).acquire().release()
    assert "no heartbeat for" in said[0]


def test_the_heartbeat_refreshes_the_lock_and_release_keeps_a_takers_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_lib, "LOCK_HEARTBEAT_S", 0.05)
    said = []
    lock = lock_lib.StageLock(tmp_path, "s", warn=said.append).acquire()
    path = tmp_path / "s" / LOCK
    first = json.loads(path.read_text())["heartbeat_s"]
    time.sleep(0.3)
    assert json.loads(path.read_text())["heartbeat_s"] > first
    plant(path, host="elsewhere")  # someone took it over (judged it stale)
    time.sleep(0.3)
    assert lock.lost and any("lost the lock" in m for m in said)
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # theirs is left alone


RACER = """
import sys, time
from sdxl_jax.train import lock
try:
    held = lock.StageLock(sys.argv[1], "s").acquire()
except lock.WorkdirInUse:
    print("refused")
else:
    print("won", flush=True)
    time.sleep(3)
    held.release()
"""


def test_of_runs_starting_together_exactly_one_wins(tmp_path):
    plant(tmp_path / "s" / LOCK, pid=dead_pid(), pid_start=None)  # and a stale lock to take
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(4)
    ]  # fmt: skip
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_lock_in_a_bucket(gcs_bucket, tmp_path):
    root = f"{gcs_bucket}/{tmp_path.name}"
    lock = lock_lib.StageLock(root, "s").acquire()
    path = epath.Path(root) / "s" / LOCK
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(lock_lib.WorkdirInUse, match=f"in use by pid {os.getpid()}"):
        lock_lib.StageLock(root, "s").acquire()
    lock.release()
    assert not path.exists()
    # A dead run's lock in the bucket is taken over (generation-conditioned delete + create).
    path.write_text(json.dumps({**json.loads(lock.record()), "pid": dead_pid(), "token": "x"}))
    said = []
    again = lock_lib.StageLock(root, "s", warn=said.append).acquire()
    assert "no longer running" in said[0]
    assert json.loads(path.read_text())["token"] == again.token
    again.release()
    assert not path.exists()
