"""``pip install .`` into a fresh virtualenv: the entry points start from any directory, and a
stage config named ``experiments/<stage>.py`` is read from the installed ``experiments`` package.

The virtualenv sees this environment's packages (``--system-site-packages``) and is built
without network access (``--no-deps --no-build-isolation``, from a copy of the sources so that
the checkout gets no build folders). Starting the tiny curriculum this way is a manual check
(it prepares data for a minute before the first step): from any directory,
``<venv>/bin/python -m sdxl_jax.train --workdir /tmp/curriculum`` reaches ``[autoencoder]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_runs_the_entry_points_from_any_directory(tmp_path):
    src = tmp_path / "src"
    for name in ("sdxl_jax", "experiments"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
        check=True,
    )
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(src)], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(python), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    where = run(
        "-c", "import sdxl_jax, experiments; print(sdxl_jax.__file__, experiments.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(str(venv)) for p in where.stdout.split()), where.stdout
    for module in ("sdxl_jax.train", "sdxl_jax.sample", "sdxl_jax.compare"):
        shown = run("-m", module, "--help")  # absl's --help exits with 1
        assert "python -m " + module in shown.stdout and not shown.stderr, shown.stderr
    page = run("-c", "from importlib import resources; print(resources.files("
               "'sdxl_jax.compare').joinpath('page.html').read_text()[:15])")  # fmt: skip
    assert page.stdout.strip() == "<!doctype html>", page.stderr  # package data installed
    # The config comes from the package (the directory has no experiments/): the stage's own
    # checks then refuse it, before anything is built.
    checked = run(
        "-m", "sdxl_jax.train", "--config", "experiments/base_256.py:tiny",
        "--workdir", str(tmp_path / "run"), "--config.optim.warmup_steps=999999",
    )  # fmt: skip
    assert checked.returncode == 2, checked.stderr[-2000:]
    assert "config for stage 'base_256' cannot run" in checked.stderr
    assert "warmup_steps exceeds optim.total_steps" in checked.stderr
