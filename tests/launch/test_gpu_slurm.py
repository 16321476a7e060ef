"""launch/gpu_slurm.sh without a cluster: its sbatch script (directives, srun line) run with fake
srun/scancel/scontrol and python: the trainer's arguments, SDXL_LOCAL_DEVICE_IDS per GPU, exit
codes, the requeue before the time limit; and the submit path with a fake sbatch."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from pathlib import Path

from tests.launch.scripts import (
    EXTRA,
    ROOT,
    SLURM,
    SLURM_REQUIRED,
    flags,
    run,
    wait_for,
    write_exe,
)


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
    # The trainer gone before scancel returns (the batch script's trap is still running).
    "scancel": 'echo "$*" >> "$FAKE/scancel"\npid=$(cat "$FAKE/python.pid")\nkill -TERM "$pid"\n'
    'while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done\n',
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
