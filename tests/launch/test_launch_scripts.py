"""launch/tpu_pod.sh and launch/gpu_slurm.sh without a cloud or a cluster.

- both parse (``bash -n``), ``--help`` names every option, a missing option fails naming it;
- tpu_pod.sh --dry-run prints create -> scp --worker=all -> pip install on --worker=all -> start
  on --worker=all -> follow worker 0, runnable as printed: the printed lines run against a fake
  gcloud, and the start command they carry, run here with a fake python, hands the trainer the
  exact arguments (spaces and quotes included) and records exit codes and SIGTERMs;
- its control flow (create if missing, recreate after a preemption, restart after a SIGTERM, stop
  on exit 0, fail on 2/3) against a fake gcloud answering ``describe`` and the trainer's state
  from scripted sequences;
- gpu_slurm.sh's sbatch script (directives, srun line) run with fake srun/scancel/scontrol and
  python: the trainer's arguments, SDXL_LOCAL_DEVICE_IDS per GPU, exit codes, the requeue before
  the time limit; and the submit path with a fake sbatch.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sh"

NAME = "sdxl-test"
TPU_REQUIRED = {
    "--name": NAME,
    "--zone": "us-central2-b",
    "--project": "my-proj",
    "--accelerator-type": "v4-32",
    "--config": "experiments/base_256.py",
    "--workdir": "gs://bucket/run",
}
SLURM_REQUIRED = {
    "--nodes": "2",
    "--gpus-per-node": "4",
    "--config": "experiments/base_256.py",
    "--workdir": "/shared/my runs",
}
EXTRA = ["--config.optim.lr=3e-4", "--config.data.path=/data/my photos", 'it\'s "odd"']


def flags(options: dict[str, str]) -> list[str]:
    return [w for k, v in options.items() for w in (k, v)]


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run(cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=20, env={**os.environ, **(env or {})}, **kw
    )


def wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text().strip()


# ---- Both scripts ------------------------------------------------------------------------------
TPU_OPTIONS = [*TPU_REQUIRED, "--spot", "--queued", "--runtime-version", "--dry-run", "--help"]
SLURM_OPTIONS = [
    *SLURM_REQUIRED,
    "--process-per",
    "--partition",
    "--time",
    "--account",
    "--job-name",
    "--log-dir",
    "--dry-run",
    "--help",
]


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_bash_syntax(script):
    assert run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize(
    "script,options", [(TPU, TPU_OPTIONS), (SLURM, SLURM_OPTIONS)], ids=["tpu", "slurm"]
)
def test_help_names_every_option(script, options):
    out = run([str(script), "--help"])
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, option
    assert "Examples:" in out.stdout


@pytest.mark.parametrize(
    "script,required,missing",
    [(TPU, TPU_REQUIRED, k) for k in TPU_REQUIRED]
    + [(SLURM, SLURM_REQUIRED, k) for k in SLURM_REQUIRED],
)
def test_missing_option_is_named(script, required, missing):
    options = {k: v for k, v in required.items() if k != missing}
    out = run([str(script), *flags(options), "--dry-run"])
    assert out.returncode == 2
    assert f"missing required option(s): {missing}" in out.stderr
    assert out.stdout == ""


@pytest.mark.parametrize(
    "script,bad,message",
    [
        (TPU, {"--config": "experiments/nope.py"}, "--config 'experiments/nope.py': no file"),
        (TPU, {"--accelerator-type": "tpu7x-8"}, "pass --runtime-version"),
        (TPU, {"--name": "My_TPU"}, "--name 'My_TPU'"),
        (SLURM, {"--process-per": "socket"}, "--process-per 'socket'"),
        (SLURM, {"--nodes": "two"}, "--nodes 'two'"),
    ],
)
def test_bad_option_value_is_named(script, bad, message):
    required = TPU_REQUIRED if script == TPU else SLURM_REQUIRED
    out = run([str(script), *flags({**required, **bad}), "--dry-run"])
    assert out.returncode == 2
    assert message in out.stderr


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


# ---- gpu_slurm.sh ------------------------------------------------------------------------------
def slurm_dry_run(tmp_path: Path, *options: str) -> tuple[str, str, Path]:
    """(script, sbatch command, script path) from --dry-run."""
    out = run(
        [
            str(SLURM),
            *flags(SLURM_REQUIRED),
            "--log-dir",
            str(tmp_path / "logs"),
            *options,
            "--dry-run",
            "--",
            *EXTRA,
        ]
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"mkdir -p {tmp_path / 'logs'}"
    head = shlex.split(lines[1])
    assert head[:2] == ["cat", ">"] and head[3] == "<<SBATCH"  # a quoted here-document
    assert lines[-2] == "SBATCH"
    return "\n".join(lines[2:-2]) + "\n", lines[-1], Path(head[2])


SLURM_FAKES = {
    "srun": 'printf "%s\\n" "$*" >> "$FAKE/srun"\nwhile [[ $1 == -* ]]; do shift; done\n'
    'SLURM_LOCALID=3 "$@"\n',
    "scancel": 'echo "$*" >> "$FAKE/scancel"\nkill -TERM "$(cat "$FAKE/python.pid")"\n',
    "scontrol": 'echo "$*" >> "$FAKE/scontrol"\n',
    "python": 'printf "%s\\0" "$@" > "$FAKE/argv"\necho "${SDXL_LOCAL_DEVICE_IDS-unset}" > '
    '"$FAKE/ids"\necho $$ > "$FAKE/python.pid"\nif [ -n "${FAKE_WAIT:-}" ]; then\n'
    "  trap 'exit 0' TERM\n  while :; do sleep 0.05; done\nfi\n"
    'exit "${FAKE_RC:-0}"\n',
}


def slurm_job(tmp_path: Path, script: str, **env: str) -> tuple[subprocess.Popen, Path]:
    """Runs the sbatch script as Slurm would, with fake srun, scancel, scontrol and python."""
    fake = tmp_path / "fake"
    for name, body in SLURM_FAKES.items():
        write_exe(fake / "bin" / name, "#!/usr/bin/env bash\n" + body)
    job = write_exe(tmp_path / "job.sbatch", script)
    proc = subprocess.Popen(
        ["bash", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "PATH": f"{fake / 'bin'}:{os.environ['PATH']}",
            "FAKE": str(fake),
            "SLURM_JOB_ID": "42",
            "SLURM_CPUS_ON_NODE": "16",
            "SLURM_JOB_NODELIST": "n[1-2]",
            **env,
        },
    )
    return proc, fake


def python_argv(fake: Path) -> list[str]:
    return [a.decode() for a in (fake / "argv").read_bytes().split(b"\0")[:-1]]


TRAINER_ARGV = [
    "-m",
    "sdxl_jax.train",
    "--config",
    "experiments/base_256.py",
    "--workdir",
    "/shared/my runs",
    *EXTRA,
]


def test_slurm_one_process_per_node(tmp_path):
    script, submit, path = slurm_dry_run(
        tmp_path, "--partition", "gpu", "--time", "24:00:00", "--account", "my-lab"
    )
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--requeue",
        "--signal=B:USR1@300",
        "--open-mode=append",
        "--partition=gpu",
        "--time=24:00:00",
        "--account=my-lab",
        "--job-name=sdxl_jax-base_256",
        f"--output={tmp_path / 'logs'}/%x-%j.log",
        f"--chdir={ROOT}",
    ]:
        assert f"#SBATCH {expected}" in directives, expected
    assert shlex.split(submit) == ["sbatch", "--parsable", str(path)]
    assert path == tmp_path / "logs" / "sdxl_jax-base_256.sbatch"
    assert "SDXL_LOCAL_DEVICE_IDS" not in script

    proc, fake = slurm_job(tmp_path, script)
    assert proc.wait(timeout=20) == 0, proc.stdout.read()
    assert python_argv(fake) == TRAINER_ARGV
    assert (fake / "ids").read_text() == "unset\n"
    srun = (fake / "srun").read_text()
    assert "--ntasks-per-node=1 --cpus-per-task=16" in srun and "--kill-on-bad-exit=1" in srun
    assert not (fake / "scontrol").exists()  # finished: no requeue


def test_slurm_one_process_per_gpu_and_exit_codes(tmp_path):
    script, _, _ = slurm_dry_run(tmp_path, "--process-per", "gpu")
    assert "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --partition" not in script and "#SBATCH --time" not in script
    proc, fake = slurm_job(tmp_path, script, FAKE_RC="3")
    assert proc.wait(timeout=20) == 3  # diverged: the job fails, no requeue
    assert python_argv(fake) == TRAINER_ARGV
    assert (fake / "ids").read_text() == "3\n"  # this task's $SLURM_LOCALID
    assert "--ntasks-per-node=4 --cpus-per-task=4" in (fake / "srun").read_text()
    assert not (fake / "scontrol").exists()


def test_slurm_time_limit_saves_then_requeues(tmp_path):
    script, _, _ = slurm_dry_run(tmp_path)
    proc, fake = slurm_job(tmp_path, script, FAKE_WAIT="1")
    python = int(wait_for(fake / "python.pid"))
    try:
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends to the batch script
        assert proc.wait(timeout=20) == 0, proc.stdout.read()
    finally:  # a failed test leaves no job behind
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(python, signal.SIGKILL)
    assert (fake / "scancel").read_text() == "--signal=TERM 42\n"
    assert (fake / "scontrol").read_text() == "requeue 42\n"


def test_slurm_submits_and_says_how_to_follow(tmp_path):
    script, _, path = slurm_dry_run(tmp_path, "--job-name", "mine")
    answer = f'echo "$*" > {tmp_path}/sbatch_args\necho "1234;c1"'
    fake = write_exe(tmp_path / "bin" / "sbatch", f"#!/usr/bin/env bash\n{answer}\n")
    out = run(
        [
            str(SLURM),
            *flags(SLURM_REQUIRED),
            "--log-dir",
            str(tmp_path / "logs"),
            "--job-name",
            "mine",
            "--",
            *EXTRA,
        ],
        env={"PATH": f"{fake.parent}:{os.environ['PATH']}"},
    )
    assert out.returncode == 0, out.stderr
    written = tmp_path / "logs" / "mine.sbatch"
    assert written.read_text() == script and written == path
    assert (tmp_path / "sbatch_args").read_text() == f"--parsable {written}\n"
    assert "submitted job 1234" in out.stdout
    assert f"tail -F {tmp_path / 'logs' / 'mine-1234.log'}" in out.stdout
    assert "scancel 1234" in out.stdout
