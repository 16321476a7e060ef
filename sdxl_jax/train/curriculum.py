"""The embedded default: the paper's curriculum at toy size, on the synthetic dataset, on CPU.

``python -m sdxl_jax.train`` with no arguments runs, in ``--workdir`` (default
``runs/tiny_curriculum``):

1. ``autoencoder``: the tiny VAE (4x downsampling) with L1 + KL + PatchGAN, EMA;
2. ``base_256``: the tiny base UNet at 32^2 (the paper's low-resolution stage);
3. ``base_1024``: from its EMA weights, multi-aspect 64^2-pixel buckets with offset noise;
4. ``refiner``: the tiny refiner UNet on the first 200 noise levels, starting from
   ``base_1024``'s EMA (at toy size it has the base's architecture apart from its text
   inputs, see :mod:`sdxl_jax.train.warm_start`); the paper trains its refiner apart;

then samples every caption of the synthetic dataset with the base + refiner exports through
``sdxl_jax.inference.generate`` and the evaluation framework (``sdxl_jax.eval``, the synthetic
evaluator) and prints the exact caption-match scores
(:mod:`sdxl_jax.data.synthetic`) next to chance. The frozen text encoders are tiny random CLIPs
with a tokenizer for the synthetic vocabulary (``<workdir>/frozen``). Rerunning the command
resumes: finished stages are skipped, an interrupted one continues from its last checkpoint.
The diffusion stages weight their loss with min-SNR-gamma 5 (``experiments/common.py`` tiny).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sdxl_jax.train.tiny_frozen import TINY_FROZEN, build_tiny_frozen

STAGES = ("autoencoder", "base_256", "base_1024", "refiner")
# Steps per stage, calibrated so the whole run stays under 15 minutes on 2 CPU cores.
STEPS = {"base_256": 200, "base_1024": 1050, "refiner": 80}
EVAL = dict(images_per_caption=2, steps=30, guidance=7.0, size=64, seed=1234)
# XLA CPU devices the curriculum splits each batch over (mesh data axis): on 2 cores, two
# devices ran the tiny step at 1.32x one device's intra-op threads (BENCHMARKS.md).
CPU_DEVICES = 2
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def use_cpu_cores(environ: dict[str, str] | None = None) -> int | None:
    """Ask XLA for ``CPU_DEVICES`` CPU devices (call before JAX starts its backend) unless
    ``XLA_FLAGS`` already names a count or the machine has one core; the count set, or None.
    Only the CPU platform's devices change: on a GPU the curriculum still runs on the GPU."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_FLAG in flags or (os.cpu_count() or 1) < CPU_DEVICES:
        return None
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_FLAG}={CPU_DEVICES}".strip()
    return CPU_DEVICES


def stage_configs(steps: dict[str, int] | None = None) -> list[Any]:
    """The tiny variants of the curriculum's stage configs, with the calibrated step counts."""
    from experiments import autoencoder, base_256, base_1024, refiner

    steps = {**STEPS, **(steps or {})}
    configs = []
    for module in (autoencoder, base_256, base_1024, refiner):
        c = module.get_config("tiny")
        if c.stage in steps:
            c.optim.total_steps = steps[c.stage]
        if c.stage == "base_1024":
            c.init_from = "base_256"  # the 512^2 stage is left out at toy size
        if c.stage == "refiner":
            c.data.bucket_set = "tiny_square_64"  # one compiled shape: CPU compiles cost ~25 s
            c.init_from = "base_1024"  # same architecture at toy size (train/warm_start.py)
        c.log.sample_every_steps = 0  # the final evaluation samples; compiles cost time here
        configs.append(c)
    return configs


def evaluate(workdir: Path, *, base: Path, refiner: Path | None) -> dict[str, Any]:
    """Sample every synthetic caption with base (+ refiner) and score the images with the
    synthetic evaluator, through the evaluation framework (``sdxl_jax.eval.run``) that
    ``python -m sdxl_jax.sample --eval synthetic`` uses: images, manifest and ``eval.json`` in
    ``<workdir>/eval``."""
    from sdxl_jax.data import synthetic
    from sdxl_jax.eval import prompts, run
    from sdxl_jax.inference import generate

    t0 = time.perf_counter()
    prompt_set = prompts.load(prompts.SYNTHETIC)
    scorers = run.load_scorers(run.EvalSpec(("synthetic",)), prompt_set)
    models = generate.check_models(base, refiner=refiner)
    generator = generate.Generator(models, batch_size=48, progress=True)  # fp32 on CPU
    report = run.evaluate_generation(
        generator, prompt_set, scorers, out=workdir / "eval", guidance=[EVAL["guidance"]],
        request=dict(
            num_images=EVAL["images_per_caption"], steps=EVAL["steps"], sampler="ddim",
            height=EVAL["size"], width=EVAL["size"], seed=EVAL["seed"],
        ),
        settings=dict(checkpoint=str(base), refiner=str(refiner) if refiner else None, **EVAL),
    )  # fmt: skip
    row = report["results"][0]
    keys = ("colour", "shape", "position", "all")
    return {
        "scores": {k: row[f"synthetic_{k}"] for k in keys},
        "chance": synthetic.chance_levels(),
        "images": row["synthetic_images"],
        "settings": EVAL,
        "refiner": refiner is not None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_scores(result: dict[str, Any]) -> str:
    s, c = result["scores"], result["chance"]
    rows = [f"{'':10s} {'model':>7s} {'chance':>7s}"]
    for key in ("colour", "shape", "position", "all"):
        if key in s:
            rows.append(f"{key:10s} {100 * s[key]:6.1f}% {100 * c.get(key, float('nan')):6.1f}%")
    return "\n".join(rows)


def run(workdir: str | Path, *, steps: dict[str, int] | None = None) -> dict[str, Any]:
    """The whole tiny curriculum, then the evaluation; returns timings and scores."""
    from sdxl_jax.train.loop import run_stage

    workdir = Path(workdir)
    t0 = time.perf_counter()
    frozen = workdir / TINY_FROZEN
    if not frozen.exists():
        build_tiny_frozen(frozen)
    timings = {}
    exports = {}
    for config in stage_configs(steps):
        t = time.perf_counter()
        result = run_stage(config, workdir)
        if result.status not in ("finished", "already finished"):
            return {"status": result.status, "stage": config.stage}
        timings[config.stage] = round(time.perf_counter() - t, 1)
        exports[config.stage] = result.export
    t = time.perf_counter()
    scores = evaluate(workdir, base=exports["base_1024"], refiner=exports["refiner"])
    timings["evaluation"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - t0, 1)
    summary = {"status": "finished", "timings_s": timings, **scores}
    (workdir / "curriculum.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\ncaption match of base + refiner samples (synthetic scorer):")
    print(format_scores(scores))
    print(f"stage times (s): {timings}")
    return summary
