"""launch/tpu_pod.sh without a cloud.

- --dry-run prints create -> scp --worker=all -> pip install on --worker=all -> start on
  --worker=all -> follow worker 0, runnable as printed: the printed lines run against a fake
  gcloud, and the start command they carry, run here with a fake python, hands the trainer the
  exact arguments (spaces and quotes included) and records exit codes and SIGTERMs;
- its control flow (create if missing, recreate after a preemption, restart after a SIGTERM, stop
  on exit 0, fail on 2/3) against a fake gcloud answering ``describe`` and the trainer's state
  from scripted sequences.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.scripts import (
    EXTRA,
    NAME,
    TPU,
    TPU_REQUIRED,
    flags,
    run,
    wait_for,
    write_exe,
)


# ---- tpu_pod.sh --dry-run --------------------------------------------------------------------
def tpu_dry_run(*options: str, tmp: Path) -> list[list[str]]:
    out = run(
        [str(TPU), *flags(TPU_REQUIRED), *options, "--dry-run", "--", *EXTRA],
        env={"TMPDIR": str(tmp)},
    )
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def command_of(argv: list[str]) -> str:
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return command


def index(calls: list[list[str]], pred, start: int = 0) -> int:
    for i in range(start, len(calls)):
        if pred(calls[i]):
            return i
    raise AssertionError(f"no matching command after line {start}: {calls}")


def is_ssh(argv, worker):
    return (
        argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        and argv[4] == "ssh"
        and (f"--worker={worker}" in argv)
    )


@pytest.mark.parametrize("variant", ["on-demand", "spot", "queued", "spot-queued"])
def test_tpu_dry_run_order(variant, tmp_path):
    spot, queued = "spot" in variant, "queued" in variant
    calls = tpu_dry_run(
        *(["--spot"] if spot else []), *(["--queued"] if queued else []), tmp=tmp_path
    )
    assert all(c[0] in ("gcloud", "git") for c in calls)
    assert calls[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    if queued:
        create = index(calls, lambda c: c[3:5] == ["queued-resources", "create"])
        assert calls[create][5] == NAME and f"--node-id={NAME}" in calls[create]
        assert "--runtime-version=tpu-ubuntu2204-base" in calls[create]
        index(calls, lambda c: c[3:5] == ["queued-resources", "describe"], create)  # wait: ACTIVE
        assert not any(c[3:5] == ["tpu-vm", "create"] for c in calls)
    else:
        create = index(calls, lambda c: c[3:5] == ["tpu-vm", "create"])
        assert "--version=tpu-ubuntu2204-base" in calls[create]
    assert "--accelerator-type=v4-32" in calls[create]
    assert "--zone=us-central2-b" in calls[create] and "--project=my-proj" in calls[create]
    assert ("--spot" in calls[create]) == spot
    pack = index(calls, lambda c: c[0] == "git" and "archive" in c, create)
    assert "HEAD" in calls[pack]
    scp = index(calls, lambda c: c[3:5] == ["tpu-vm", "scp"] and "--worker=all" in c, pack)
    assert calls[pack][calls[pack].index("archive") + 2].removeprefix("--output=") in calls[scp]
    install = index(calls, lambda c: is_ssh(c, "all") and "pip install" in command_of(c), scp)
    assert '-r requirements.txt "jax[tpu]" gcsfs' in command_of(calls[install])
    start = index(calls, lambda c: is_ssh(c, "all") and "sdxl_jax.train" in command_of(c), install)
    assert (
        "python -m sdxl_jax.train --config experiments/base_256.py --workdir gs://bucket/run "
        "--config.optim.lr=3e-4 --config.data.path="
    ) in command_of(calls[start])
    follow = index(calls, lambda c: is_ssh(c, 0) and "tail" in command_of(c), start)
    assert "~/sdxl_jax.log" in command_of(calls[follow])


def test_tpu_dry_run_warns_about_a_local_workdir_on_a_pod(tmp_path):
    options = {**TPU_REQUIRED, "--workdir": "/runs/sdxl"}
    out = run([str(TPU), *flags(options), "--dry-run"], env={"TMPDIR": str(tmp_path)})
    assert out.returncode == 0
    assert "not gs://" in out.stderr and "multi-host" in out.stderr
    single = run(
        [str(TPU), *flags({**options, "--accelerator-type": "v5litepod-8"}), "--dry-run"],
        env={"TMPDIR": str(tmp_path)},
    )
    assert "multi-host" not in single.stderr and "--version=v2-alpha-tpuv5-lite" in single.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$HOME/argv"
echo "step 1/2 loss 0.5"
if [ -n "${FAKE_WAIT:-}" ]; then
  trap 'echo saved; exit 0' TERM
  while :; do sleep 0.05; done
fi
exit "${FAKE_RC:-0}"
"""


def worker_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / "sdxl_jax").mkdir(parents=True)
    write_exe(home / "sdxl_venv" / "bin" / "python", FAKE_PYTHON)
    return home


def on_worker(command: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return run(["bash", "-c", command], env={"HOME": str(home), **env}, cwd=home)


def test_tpu_dry_run_runs_as_printed_and_starts_the_exact_trainer(tmp_path):
    """The printed lines run in a shell (gcloud faked); the start command they pass, run here as a
    worker would, hands python exactly the trainer flags and writes the exit code."""
    printed = run(
        [str(TPU), *flags(TPU_REQUIRED), "--dry-run", "--", *EXTRA], env={"TMPDIR": str(tmp_path)}
    ).stdout
    calls = tmp_path / "calls"
    record = f'printf "%s\\0" "$@" > "{calls}/$(date +%s%N)"'
    fake = write_exe(tmp_path / "bin" / "gcloud", f"#!/usr/bin/env bash\n{record}\n")
    calls.mkdir()
    out = run(["bash", "-e", "-c", printed], env={"PATH": f"{fake.parent}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    recorded = [f.read_bytes().split(b"\0")[:-1] for f in sorted(calls.iterdir())]
    argvs = [[a.decode() for a in argv] for argv in recorded]
    assert len(argvs) == len(printed.splitlines()) - 1  # every line but git archive
    assert (tmp_path / f"sdxl_jax-{NAME}.tar.gz").stat().st_size > 1000
    start = next(command_of(a) for a in argvs if "sdxl_jax.train" in " ".join(a))
    status = command_of(argvs[-1])

    home = worker_home(tmp_path)
    assert on_worker(start, home).returncode == 0
    assert wait_for(home / "sdxl_jax.exit") == "0"
    argv = (home / "argv").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv] == [
        "-m",
        "sdxl_jax.train",
        "--config",
        "experiments/base_256.py",
        "--workdir",
        "gs://bucket/run",
        *EXTRA,
    ]
    assert "step 1/2 loss 0.5" in (home / "sdxl_jax.log").read_text()
    assert on_worker(status, home).stdout == "exit 0\n"

    # A crash is recorded as its code; starting again clears the old exit file first.
    assert on_worker(start, home, FAKE_RC="3").returncode == 0
    assert wait_for(home / "sdxl_jax.exit") == "3"
    assert on_worker(status, home).stdout == "exit 3\n"
    assert (home / "sdxl_jax.log.prev").exists()  # the earlier run's log is kept


def test_tpu_start_records_a_sigterm_and_follow_ends_with_the_trainer(tmp_path):
    printed = run([str(TPU), *flags(TPU_REQUIRED), "--dry-run"], env={"TMPDIR": str(tmp_path)})
    calls = [shlex.split(line) for line in printed.stdout.splitlines()]
    start = next(command_of(c) for c in calls if "sdxl_jax.train" in " ".join(c))
    follow = next(command_of(c) for c in calls if is_ssh(c, 0) and "tail" in " ".join(c))
    status = command_of(calls[-1])
    home = worker_home(tmp_path)

    assert on_worker(start, home, FAKE_WAIT="1").returncode == 0
    pgid = int(wait_for(home / "sdxl_jax.pid"))
    try:
        log, deadline = home / "sdxl_jax.log", time.monotonic() + 10
        while not log.exists() or "step 1/2" not in log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert on_worker(status, home).stdout == "running\n"
        os.killpg(pgid, signal.SIGTERM)  # what a preemption's shutdown does to the session
        assert wait_for(home / "sdxl_jax.exit") == "0 sigterm"
    finally:  # a failed test leaves no trainer behind
        if not (home / "sdxl_jax.exit").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    assert on_worker(status, home).stdout == "exit 0 sigterm\n"
    followed = on_worker(follow.replace("tail -n +1", "tail -n +1 -s 0.1"), home)
    assert followed.returncode == 0  # tail stopped with the trainer, after its last lines
    assert followed.stdout.startswith("step 1/2 loss 0.5\n") and followed.stdout.endswith("saved\n")


# ---- tpu_pod.sh against a fake gcloud ---------------------------------------------------------
FAKE_GCLOUD = """#!/usr/bin/env bash
# Logs its argv; answers describe and the trainer's state from scripted sequences (one answer a
# line, the last one repeats).
printf '%q ' "$@" >> "$FAKE/calls"; echo >> "$FAKE/calls"
pop() {
  local lines; mapfile -t lines < "$FAKE/$1"
  if ((${#lines[@]} > 1)); then printf '%s\\n' "${lines[@]:1}" > "$FAKE/$1"; fi
  printf '%s\\n' "${lines[0]}"
}
answer() {
  local s; s=$(pop "$1")
  if [[ $s == NOT_FOUND ]]; then echo "ERROR: (gcloud) NOT_FOUND: not found" >&2; exit 1; fi
  if [[ $s == unreachable ]]; then echo "ssh: connection closed" >&2; exit 255; fi
  echo "$s"; exit 0
}
case "$*" in
  *"tpu-vm describe"*) answer vm_states ;;
  *"queued-resources describe"*) answer qr_states ;;
  *"echo running"*) answer statuses ;;
  *"tpu-vm scp"*) exit "$(pop scp_rcs)" ;;
  *"tail -n"*) echo "step 9/10 loss 0.1"; exit 0 ;;
esac
"""


def kind(argv: list[str]) -> str:
    """A short name for one recorded gcloud call."""
    group, verb = argv[2:4]
    if group == "queued-resources":
        return f"qr-{verb}"
    if verb != "ssh":
        return verb
    command = command_of(argv)
    for word, name in [
        ("pip install", "install"),
        ("sdxl_jax.train", "start"),
        ("tail -n", "follow"),
        ("echo running", "status"),
    ]:
        if word in command:
            assert f"--worker={'0' if name in ('follow', 'status') else 'all'}" in argv
            return name
    raise AssertionError(argv)


def tpu_with_fake_gcloud(tmp_path, *options, vm, statuses, qr=("NOT_FOUND",), scp=("0",)):
    fake = tmp_path / "fake"
    fake.mkdir()
    write_exe(fake / "bin" / "gcloud", FAKE_GCLOUD)
    for name, seq in [
        ("vm_states", vm),
        ("qr_states", qr),
        ("statuses", statuses),
        ("scp_rcs", scp),
    ]:
        (fake / name).write_text("\n".join(seq) + "\n")
    out = run(
        [str(TPU), *flags(TPU_REQUIRED), *options, "--", *EXTRA],
        env={
            "PATH": f"{fake / 'bin'}:{os.environ['PATH']}",
            "FAKE": str(fake),
            "TMPDIR": str(tmp_path),
            "SDXL_LAUNCH_POLL_S": "0",
        },
    )
    calls = [shlex.split(line) for line in (fake / "calls").read_text().splitlines()]
    assert not (tmp_path / f"sdxl_jax-{NAME}.tar.gz").exists()  # cleaned up
    return out, [kind(c) for c in calls], calls


SETUP = ["scp", "install", "start", "follow", "status"]


def test_tpu_creates_a_missing_vm_and_stops_when_the_trainer_finishes(tmp_path):
    out, kinds, calls = tpu_with_fake_gcloud(
        tmp_path, vm=["NOT_FOUND", "READY"], statuses=["exit 0"]
    )
    assert out.returncode == 0, out.stderr
    assert kinds == ["describe", "create", "describe", *SETUP]
    assert "step 9/10 loss 0.1" in out.stdout  # worker 0's log, streamed
    assert "--config.optim.lr=3e-4" in command_of(calls[kinds.index("start")])


def test_tpu_retries_a_failed_copy(tmp_path):
    out, kinds, _ = tpu_with_fake_gcloud(
        tmp_path, vm=["NOT_FOUND", "READY"], statuses=["exit 0"], scp=["1", "0"]
    )
    assert out.returncode == 0, out.stderr
    assert kinds == ["describe", "create", "describe", "scp", "describe", *SETUP]


def test_tpu_follows_a_trainer_that_is_already_running(tmp_path):
    out, kinds, _ = tpu_with_fake_gcloud(tmp_path, vm=["READY"], statuses=["running", "exit 0"])
    assert out.returncode == 0, out.stderr
    assert kinds == ["describe", "status", "follow", "status"]  # no create, no second trainer


def test_tpu_recreates_a_preempted_vm_and_restarts(tmp_path):
    out, kinds, calls = tpu_with_fake_gcloud(
        tmp_path,
        "--spot",
        vm=["NOT_FOUND", "READY", "PREEMPTED", "PREEMPTED", "NOT_FOUND", "READY"],
        statuses=["unreachable", "exit 0"],
    )
    assert out.returncode == 0, out.stderr
    assert kinds == [
        "describe",
        "create",
        "describe",
        *SETUP[:-1],
        "status",  # ssh dropped
        "describe",
        "describe",
        "delete",
        "describe",
        "create",
        "describe",
        *SETUP,
    ]
    assert all("--spot" in c for c, k in zip(calls, kinds, strict=True) if k == "create")
    assert "PREEMPTED" in out.stderr


def test_tpu_restarts_after_a_sigterm_on_a_ready_vm(tmp_path):
    out, kinds, _ = tpu_with_fake_gcloud(
        tmp_path, vm=["NOT_FOUND", "READY"], statuses=["exit 0 sigterm", "exit 0"]
    )
    assert out.returncode == 0, out.stderr
    assert kinds == ["describe", "create", "describe", *SETUP, "describe", *SETUP]


@pytest.mark.parametrize("code", [2, 3])
def test_tpu_fails_on_a_bad_config_or_divergence(tmp_path, code):
    out, kinds, _ = tpu_with_fake_gcloud(
        tmp_path, vm=["NOT_FOUND", "READY"], statuses=[f"exit {code}", "exit 0"]
    )
    assert out.returncode == code
    assert kinds == ["describe", "create", "describe", *SETUP]  # no restart
    assert f"exited with code {code}" in out.stderr


def test_tpu_crash_on_a_ready_vm_is_not_retried(tmp_path):
    out, kinds, _ = tpu_with_fake_gcloud(tmp_path, vm=["READY"], statuses=["none", "exit 1"])
    assert out.returncode == 1
    assert kinds == ["describe", "status", *SETUP, "describe"]
    assert "rerun this command to resume" in out.stderr


def test_tpu_queued_spot_waits_for_capacity_and_requeues_after_preemption(tmp_path):
    out, kinds, calls = tpu_with_fake_gcloud(
        tmp_path,
        "--spot",
        "--queued",
        vm=["NOT_FOUND", "READY", "READY", "PREEMPTED", "PREEMPTED", "NOT_FOUND", "READY"],
        qr=["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE", "NOT_FOUND", "ACTIVE"],
        statuses=["unreachable", "exit 0"],
    )
    assert out.returncode == 0, out.stderr
    assert kinds == [
        "describe",
        "qr-describe",
        "qr-create",
        "qr-describe",
        "qr-describe",
        "describe",
        "describe",
        *SETUP[:-1],
        "status",
        "describe",
        "describe",
        "qr-delete",
        "describe",
        "qr-describe",
        "qr-create",
        "qr-describe",
        "describe",
        "describe",
        *SETUP,
    ]
    for c, k in zip(calls, kinds, strict=True):
        if k == "qr-create":
            assert "--spot" in c and f"--node-id={NAME}" in c and c[4] == NAME
        if k == "qr-delete":
            assert "--force" in c
    assert "WAITING_FOR_RESOURCES" in out.stderr
