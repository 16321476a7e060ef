"""Real ``python -m sdxl_jax.train`` runs for the tests: the parts they share (frozen tiny text
encoders, a random tiny VAE, a prepared dataset, one persistent compilation cache for the whole
session), config overrides for the micro UNet, and launching one process or N (launch/local.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


def make_parts(root: Path) -> dict[str, Path]:
    from flax import nnx

    from sdxl_jax.models.vae import AutoencoderKL, VAEConfig
    from sdxl_jax.train import tiny_frozen
    from sdxl_jax.weights import diffusers_io
    from tests.data.fixtures import prepared_dataset

    tiny_frozen.build_tiny_frozen(root / "frozen")
    vae = AutoencoderKL(VAEConfig.tiny(), rngs=nnx.Rngs(0))
    diffusers_io.save_component(vae, root / "vae_export", "vae")
    data, _ = prepared_dataset(root / "data", 96, ("tiny_square_32", "tiny_aspect_64"))
    # Latents and text embeddings for tiny_square_32 (base_256:tiny), built once for every run
    # (data.cache=auto would build it again in each run's workdir).
    from sdxl_jax.train import cache_builder

    cache_builder.build_cache(data, root / "frozen", root / "latents_32",
                              bucket_set="tiny_square_32", vae=root / "vae_export",
                              dtype="float32", progress=False)  # fmt: skip
    return {"frozen": root / "frozen", "vae": root / "vae_export", "data": data,
            "latents": root / "latents_32", "cache": root / "xla_cache"}  # fmt: skip


def overrides(parts, **extra) -> dict[str, str]:
    o = {
        "model.preset": "micro",  # the test-size UNet: same code, half the compile time
        "model.checkpoint": parts["frozen"],
        "model.vae": parts["vae"],
        "data.path": parts["data"],
        "data.cache": parts["latents"],  # base_256:tiny's buckets; other stages: pass "auto"
        "optim.total_steps": STEPS,
        "optim.warmup_steps": 3,
        "log.every_steps": 1,
        "log.sample_every_steps": 0,
        "checkpoint.every_steps": 5,
        **extra,
    }
    return {k: str(v) for k, v in o.items()}


def config_with(module, parts, **extra):
    """``module``'s tiny config with ``overrides`` (typed as the config's fields)."""
    c = module.get_config("tiny")
    for k, v in {**overrides(parts), **extra}.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = type(node[leaf])(v) if not isinstance(v, type(node[leaf])) else v
    return c


def _env(parts, **more) -> dict[str, str]:
    return {
        **os.environ,
        # the session's persistent compilation cache (tests/conftest.py), or this one
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "JAX_COMPILATION_CACHE_DIR", str(parts["cache"])
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONPATH": str(ROOT),
        **more,
    }


def trainer_args(parts, workdir: Path, config: str, flags=(), **extra) -> list[str]:
    args = [f"--config.{k}={v}" for k, v in overrides(parts, **extra).items()]
    return ["--config", config, "--workdir", str(workdir), *flags, *args]


def launch(
    parts, workdir: Path, config: str = "experiments/base_256.py:tiny", flags=(), env=None, **extra
) -> subprocess.Popen:
    """One trainer process (the test session's own device count unless ``env`` says)."""
    cmd = [
        sys.executable,
        "-m",
        "sdxl_jax.train",
        *trainer_args(parts, workdir, config, flags, **extra),
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(parts, **(env or {})), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def launch_local(
    parts,
    workdir: Path,
    processes: int,
    devices: int,
    config: str = "experiments/base_256.py:tiny",
    flags=(),
    module: str = "sdxl_jax.train",
    log_dir: Path | None = None,
    **extra,
) -> subprocess.Popen:
    """``processes`` trainer processes with ``devices`` CPU devices each, via launch/local.sh
    (logs in ``log_dir``, default ``workdir/logs``)."""
    cmd = [
        "bash", str(ROOT / "launch" / "local.sh"), "-n", str(processes),
        "--devices-per-process", str(devices),
        "--log-dir", str(log_dir or Path(workdir) / "logs"),
        "--module", module, "--",
        *trainer_args(parts, workdir, config, flags, **extra),
    ]  # fmt: skip
    env = _env(parts, PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # local.sh sets the device count
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def losses(workdir: Path, stage: str = "base_256") -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a step logged twice (re-run after a kill) keeps the
    later line."""
    out = {}
    for line in (workdir / stage / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["step"]] = rec["train/loss"]
    return out
