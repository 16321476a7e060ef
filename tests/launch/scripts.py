"""What the launch-script tests share: the scripts, their required options, a trainer argument
list with spaces and quotes, and small process helpers."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

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
