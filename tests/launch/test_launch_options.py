"""launch/tpu_pod.sh and launch/gpu_slurm.sh: both parse (``bash -n``), ``--help`` names every
option, a missing or bad option fails naming it, before anything runs."""

from __future__ import annotations

import pytest

from tests.launch.scripts import (
    SLURM,
    SLURM_REQUIRED,
    TPU,
    TPU_REQUIRED,
    flags,
    run,
)

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
