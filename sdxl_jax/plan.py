"""Paper-scale plan on paper: step time, throughput, wall days, chip-hours and per-device memory
of a training stage on N accelerators, from XLA's FLOP count of the stage's own train step.

    python -m sdxl_jax.plan --config experiments/base_256.py --chips 256 --chip v5p
    python -m sdxl_jax.plan --curriculum --chips 64 --chip h100 --mesh fsdp=8,data=-1
    python -m sdxl_jax.plan --config experiments/base_1024.py --chips 8 --chip h100 --compile

Measured here (on the CPU, no accelerator needed):

- FLOPs per sample: the stage's train step (cached latents and text embeddings, bf16 compute over
  fp32 master weights, AdamW + EMA; ``train_step`` from ``sdxl_jax.train``) lowered on abstract
  inputs on one CPU device at batch 8, scanned stacks unrolled (XLA's cost analysis counts a scan
  body once), without recomputation: model FLOPs, which MFU is defined over. FLOPs per sample =
  XLA's count / 8 (the optimizer's per-step work, 0.07 TFLOP, is spread over those 8: +0.7% at
  256^2, +0.04% at 1024^2).
- Activation memory per sample: the CPU compiler's memory plan of the scanned step as it trains
  (remat as configured) on 8 simulated devices, at 1 and 2 samples per device: the difference is
  one sample's, the rest fixed. Devices on the data axis for meshes with fsdp=1, on fsdp
  otherwise. Stored constants (sdxl_base and sdxl_refiner at 1024^2, remat on) unless
  ``--compile`` measures the stage now (minutes). The CPU compiler upcasts bf16 matmuls to fp32
  and uses XLA attention, so an accelerator's plan should be smaller.

Analytic: the train state per device (fp32 params, two Adam moments, the EMA) and the fp32
gradients, from the parameter count and the mesh's sharding rules (``sdxl_jax.sharding``).

Assumed: the MFU (default 0.40) and each chip's vendor peak dense bf16 FLOP/s and HBM (``CHIPS``).

Multi-aspect bucket sets: FLOPs come from lowering the set's most square bucket, scaled to the
mean pixel count over the set (unweighted: the data decides how often each bucket comes). The
attention's quadratic share makes linear scaling high by 0.7% from 1024x1024 to 960x1024 (6%
fewer pixels; the sdxl_1024 mean is 4.5% below 1024^2). Memory is for the largest bucket, since
every bucket must fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdxl_jax import sharding as sh
from sdxl_jax.data import buckets
from sdxl_jax.models.lora import attach
from sdxl_jax.train import config as config_lib
from sdxl_jax.train.lowering import (
    COMPILE_DEVICES,
    Activations,
    flops_per_sample,
    measure_activations,
    param_bytes_per_device,
)
from sdxl_jax.train.state import optimizer_from_config
from sdxl_jax.weights.components import COMPONENTS

CURRICULUM = ("base_256", "base_512", "base_1024", "refiner")
# Where each paper stage's step count comes from (SPEC "Training recipe", paper 2.5).
STEPS_SOURCE = {
    "base_256": "paper: 600k steps at 256^2, batch 2048",
    "base_512": "paper: 200k steps at 512^2",
    "base_1024": "config: the paper gives no step count for the multi-aspect stage",
    "refiner": "config: the paper gives no step count for the refiner",
}
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s, vendor figure
    hbm_bytes: float  # vendor figure (decimal GB)


CHIPS: dict[str, Chip] = {
    "v5p": Chip("TPU v5p", 459e12, 95 * GB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GB),
    "v4": Chip("TPU v4", 275e12, 32 * GB),
    "h100": Chip("H100 SXM", 989e12, 80 * GB),
    "h200": Chip("H200 SXM", 989e12, 141 * GB),
    "a100": Chip("A100 SXM", 312e12, 80 * GB),
}


# Measured with --compile (``measure_activations``) at the 1024x1024 bucket, remat on, bf16
# compute, on 8 simulated devices all on one axis: "data" (weights replicated, what meshes with
# fsdp=1 use) or "fsdp"; 2-core CPU VM, jax 0.10.2, 2026-11-26. The fsdp figures are after
# layers.constrain_batch (activations kept split over the batch; before it the partitioner
# gathered them: 22.0 GB per sample per device for the base at fsdp=8, 1.84x the FLOPs).
STORED_ACTIVATIONS: dict[tuple[str, str], Activations] = {
    ("sdxl_base", "data"): Activations(2_924_370_624, 7_540_190_768, 128 * 128, "data=8"),
    ("sdxl_base", "fsdp"): Activations(4_480_000_000, 1_920_000_000, 128 * 128, "fsdp=8"),
    ("sdxl_refiner", "data"): Activations(4_159_735_552, 5_200_879_632, 128 * 128, "data=8"),
    ("sdxl_refiner", "fsdp"): Activations(4_680_000_000, 4_850_000_000, 128 * 128, "fsdp=8"),
}


# -- a stage from its config -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """What the plan needs from a stage config, resolved for a device count."""

    name: str
    preset: str
    unet: Any  # UNetConfig, remat as configured
    refiner: bool
    compute_dtype: str
    vae_factor: int  # pixels per latent
    bucket_set: str
    buckets: tuple[tuple[int, int], ...]
    lowered_bucket: tuple[int, int]  # pixels (h, w)
    steps: int  # optimizer updates
    steps_source: str
    global_batch: int  # per step call
    accumulate: int
    mesh: dict[str, int]
    optim: Any
    lora: Any = None  # LoRAConfig: only adapters train, over a frozen base

    @property
    def images_per_step(self) -> int:
        return self.global_batch * self.accumulate

    @property
    def batch_per_device(self) -> int:
        return self.global_batch // (self.mesh["data"] * self.mesh["fsdp"])

    @property
    def mean_pixels(self) -> float:
        return sum(h * w for h, w in self.buckets) / len(self.buckets)

    @property
    def max_latent_pixels(self) -> int:
        return max(h * w for h, w in self.buckets) // self.vae_factor**2

    @property
    def lowered_latent(self) -> tuple[int, int]:
        h, w = self.lowered_bucket
        return h // self.vae_factor, w // self.vae_factor


def parse_mesh(text: str) -> dict[str, int]:
    """``data=-1,fsdp=8`` -> {"data": -1, "fsdp": 8}; axes left out are 1."""
    out = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(
                f"--mesh {text!r}: write axis=size pairs, e.g. data=-1,fsdp=8"
            ) from None
    return out


def stage_from_config(
    config: Any,
    chips: int,
    *,
    batch: int | None = None,
    steps: int | None = None,
    mesh: Mapping[str, int] | None = None,
) -> Stage:
    """Resolve ``config`` (a stage ConfigDict) for ``chips`` devices; the overrides replace the
    config's global batch, steps and mesh. Raises ValueError naming the fix (the training's own
    checks, ``sdxl_jax.train.config.validate``)."""
    config = config.copy_and_resolve_references()
    if config.get("lora") is not None and not config.init_from:
        config.init_from = "(pretrained)"  # a LoRA stage's required base: not read by the plan
    if config.get("dreambooth") is not None:  # its data fields: not read by the plan either
        db = config.dreambooth
        db.instance_data = db.instance_data or "(instance images)"
        db.instance_prompt = db.instance_prompt or "(instance prompt)"
        db.class_prompt = db.class_prompt or "(class prompt)"
    if batch is not None:
        config.data.global_batch_size = batch
    if mesh is not None:
        config.mesh = dict(mesh)
    if config.get("kind", "diffusion") != "diffusion":
        raise ValueError(f"stage {config.stage!r} trains an autoencoder: the plan covers UNets")
    try:
        config_lib.validate(config, chips)
    except ValueError as e:
        raise ValueError(
            f"on {chips} chips, {e}\n(the plan's --batch, --chips and --mesh set these)"
        ) from None
    sizes = sh.mesh_shape({**{a: 1 for a in sh.MESH_AXES}, **dict(config.mesh)}, chips)
    bset = buckets.bucket_set(config.data.bucket_set)
    preset = config.model.preset
    unet = dataclasses.replace(config_lib.unet_config(preset), remat=bool(config.model.remat))
    return Stage(
        name=config.stage,
        preset=preset,
        unet=unet,
        refiner=preset.endswith("refiner"),
        compute_dtype=config.model.compute_dtype,
        vae_factor=config_lib.vae_config(preset).downscale,
        bucket_set=bset.name,
        buckets=tuple(bset.sizes),
        # The most square bucket (then the largest): a shape every set has a near version of.
        lowered_bucket=min(bset.sizes, key=lambda s: (abs(math.log(s[0] / s[1])), -s[0] * s[1])),
        steps=int(steps if steps is not None else config.optim.total_steps),
        steps_source="--steps" if steps is not None else STEPS_SOURCE.get(config.stage, "config"),
        global_batch=int(config.data.global_batch_size),
        accumulate=int(config.optim.accumulate),
        mesh=sizes,
        optim=config.optim,
        lora=config_lib.lora_config(config),
    )


# -- the estimate (plain arithmetic) -----------------------------------------------------


def throughput(
    flops: float, images_per_step: int, chips: int, peak: float, mfu: float, steps: int
) -> dict[str, float]:
    """Step time = FLOPs per sample x images per step / (chips x peak x MFU), and what follows."""
    step_s = flops * images_per_step / (chips * peak * mfu)
    return {
        "step_s": step_s,
        "images_per_s": images_per_step / step_s,
        "images_per_s_per_chip": images_per_step / step_s / chips,
        "wall_days": steps * step_s / 86400,
        "chip_hours": chips * steps * step_s / 3600,
    }


def memory(
    param_bytes: float, act: Activations | None, latent_pixels: int, batch: int, hbm: float,
    frozen_bytes: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Per-device bytes: state (fp32 params, Adam mu and nu, EMA: 4 x the param shard), fp32
    gradients (1 x), a LoRA stage's frozen base (``frozen_bytes``), ``act.other`` and ``batch``
    samples' activations scaled to ``latent_pixels``; the largest batch that fits ``hbm``."""
    out: dict[str, Any] = {
        "state_bytes": 4 * param_bytes,
        "grad_bytes": param_bytes,
        "frozen_bytes": frozen_bytes,
    }
    if act is None:
        none = ("other_bytes", "activations_per_sample", "total_bytes", "max_batch", "fits")
        return out | dict.fromkeys(none) | {"activations_source": "none"}
    per_sample = act.per_sample * latent_pixels / act.latent_pixels
    fixed = 5 * param_bytes + frozen_bytes + act.other
    total = fixed + batch * per_sample
    scaled = "" if latent_pixels == act.latent_pixels else ", scaled by latent pixels"
    return out | {
        "other_bytes": act.other,
        "activations_per_sample": per_sample,
        "activations_source": act.source + scaled,
        "total_bytes": total,
        "max_batch": max(0, math.floor((hbm - fixed) / per_sample)),
        "fits": total <= hbm,
    }


def fix_for(stage: Stage, max_batch: int | None) -> str:
    """What to change when a stage does not fit: accumulate gradients, or shard more."""
    b = stage.batch_per_device
    if max_batch is None or b <= max_batch:
        return ""
    more = "shard the state over all chips (--mesh fsdp=-1)" if stage.mesh["data"] > 1 else ""
    more = more or "use more chips (fsdp already spans them all)"
    if max_batch == 0:
        return f"the state alone does not fit: {more}"
    k = next(k for k in range(2, b + 1) if b % k == 0 and b // k <= max_batch)
    return (
        f"{b} per device > {max_batch}: accumulate {k} steps (optim.accumulate={k} with "
        f"data.global_batch_size={stage.global_batch // k}), or {more}"
    )


def plan_stage(
    stage: Stage, chip: Chip, chips: int, mfu: float, *, compile: bool = False,
    count_remat: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Lower (and with ``compile``, compile) the stage's step; the plan's row, in SI units."""

    kw = dict(
        refiner=stage.refiner,
        compute_dtype=stage.compute_dtype,
        optimizer=optimizer_from_config(stage.optim),
        lora=stage.lora,
    )
    remat = count_remat and stage.unet.remat
    flops_lowered = flops_per_sample(stage.unet, stage.lowered_latent, remat=remat, **kw)
    flops = flops_lowered * stage.mean_pixels / math.prod(stage.lowered_bucket)
    axis = "fsdp" if stage.mesh["fsdp"] > 1 else "data"
    if compile:
        act = measure_activations(stage.unet, stage.lowered_latent, axis=axis, **kw)
    elif stage.unet.remat and stage.lora is None:  # the stored constants: remat on, no LoRA
        act = STORED_ACTIVATIONS.get((stage.preset, axis))
        if act is not None:
            act = dataclasses.replace(act, source=f"stored: CPU plan at 1024^2, {act.source}")
    else:
        act = None
    params, frozen = _abstract_params(stage.unet, stage.compute_dtype, stage.lora)
    row = {
        "stage": stage.name,
        "bucket_set": stage.bucket_set,
        "buckets": len(stage.buckets),
        "mean_pixels": stage.mean_pixels,
        "lowered_bucket": list(stage.lowered_bucket),
        "flops_per_sample_lowered_bucket": flops_lowered,
        "flops_per_sample": flops,
        "flops_counted": "hardware (with recomputation)" if remat else "model (no recomputation)",
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "frozen_params": sum(x.size for x in jax.tree.leaves(frozen)),
        "lora": None if stage.lora is None else dataclasses.asdict(stage.lora),
        "steps": stage.steps,
        "steps_source": stage.steps_source,
        "global_batch": stage.global_batch,
        "accumulate": stage.accumulate,
        "images_per_step": stage.images_per_step,
        "mesh": stage.mesh,
        "batch_per_device": stage.batch_per_device,
        "remat": stage.unet.remat,
    }
    row |= throughput(flops, stage.images_per_step, chips, chip.peak_flops, mfu, stage.steps)
    param_bytes = param_bytes_per_device(params, stage.mesh)
    per_device = stage.batch_per_device
    frozen_bytes = param_bytes_per_device(frozen, stage.mesh)
    row |= memory(
        param_bytes, act, stage.max_latent_pixels, per_device, chip.hbm_bytes, frozen_bytes
    )
    if act is None:
        row["activations_source"] = "none stored for this preset and remat: run with --compile"
    elif axis == "fsdp" and stage.mesh["fsdp"] != COMPILE_DEVICES:
        row["activations_source"] += (
            f" (measured at fsdp={COMPILE_DEVICES}; this mesh has fsdp={stage.mesh['fsdp']}: "
            f"--compile measures it)"
        )
    row["fix"] = fix_for(stage, row["max_batch"])
    return row


@functools.lru_cache(maxsize=8)
def _abstract_params(unet: Any, compute_dtype: str, lora: Any = None) -> tuple[Any, Any]:
    """(trained parameters, frozen ones): the UNet's and nothing, or a LoRA stage's adapters
    and its base in the compute dtype."""
    model = COMPONENTS["unet"].abstract(unet, dtype=jnp.dtype(compute_dtype))
    if lora is None:
        return nnx.split(model, nnx.Param, ...)[1], {}
    attach(model, lora, nnx.Rngs(0))
    _, adapters, base, _ = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    dtype = jnp.dtype(compute_dtype)
    return adapters, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), base)


# -- output ------------------------------------------------------------------------------


def _gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GB:.1f} GB"


def _duration(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def format_plan(rows: Sequence[dict[str, Any]], chip: Chip, chips: int, mfu: float) -> str:
    """Two markdown tables (compute, memory) and notes on what is measured or assumed."""
    lines = [
        f"{chips} x {chip.name}: vendor peak {chip.peak_flops / 1e12:.0f} TFLOP/s dense bf16 and "
        f"{chip.hbm_bytes / GB:.0f} GB HBM per chip; assumed MFU {mfu:.2f}",
        "",
        "| stage | buckets: mean pixels | steps | images/step | TFLOP/sample | step | "
        "images/s | images/s/chip | wall | chip-hours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['bucket_set']} ({r['buckets']}): "
            f"{r['mean_pixels'] / 1e6:.3f} Mpx | {r['steps']:,} | {r['images_per_step']:,} | "
            f"{r['flops_per_sample'] / 1e12:.2f} | {_duration(r['step_s'])} | "
            f"{r['images_per_s']:,.0f} | {r['images_per_s_per_chip']:.1f} | "
            f"{r['wall_days']:.1f} days | {r['chip_hours']:,.0f} |"
        )
    if len(rows) > 1:
        days = sum(r["wall_days"] for r in rows)
        hours = sum(r["chip_hours"] for r in rows)
        lines.append(f"| total | | | | | | | | {days:.1f} days | {hours:,.0f} |")
    lines += [
        "",
        "| stage | mesh | state + grads / device | other | activations / sample | "
        "batch / device | need / device | max batch / device | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh = " ".join(f"{a}={n}" for a, n in r["mesh"].items())
        fits = {None: "n/a", True: "yes", False: "**no**"}[r["fits"]]
        lines.append(
            f"| {r['stage']} | {mesh} | {_gb(r['state_bytes'])} + {_gb(r['grad_bytes'])}"
            + (f" + {_gb(r['frozen_bytes'])} frozen base" if r["frozen_bytes"] else "")
            + " | "
            f"{_gb(r['other_bytes'])} | {_gb(r['activations_per_sample'])} | "
            f"{r['batch_per_device']} | {_gb(r['total_bytes'])} | "
            f"{'n/a' if r['max_batch'] is None else r['max_batch']} | {fits} |"
        )
    lines += ["", "Per stage:"]
    for r in rows:
        h, w = r["lowered_bucket"]
        lora = r["lora"]
        trained = (
            f"LoRA rank {lora['rank']} on {', '.join(lora['groups'])}: "
            f"{r['params'] / 1e6:.1f}M trained params over a frozen "
            f"{r['frozen_params'] / 1e9:.2f}B base"
            if lora
            else f"{r['params'] / 1e9:.2f}B params"
        )
        lines.append(
            f"- {r['stage']}: {trained}; {r['flops_counted']} FLOPs of the "
            f"{h}x{w} bucket ({r['flops_per_sample_lowered_bucket'] / 1e12:.2f} TFLOP/sample) "
            f"scaled by pixels to the set's mean; steps: {r['steps_source']}; activations: "
            f"{r['activations_source']}, for the largest bucket"
            + (f". Does not fit: {r['fix']}" if r["fix"] else "")
        )
    lines += [
        "",
        "Measured: XLA's FLOP count of the lowered train step (CPU); activation memory from the "
        "CPU compiler's plan (it upcasts bf16 matmuls to fp32 and uses XLA attention: an "
        "accelerator's plan should be smaller). Analytic: state and gradients from the parameter "
        "count and the sharding rules. Assumed: the MFU and the vendor peak FLOP/s and HBM, with "
        "no allowance for the runtime's own reserve.",
    ]
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a stage config, experiments/<stage>.py[:arg]")
    what.add_argument(
        "--curriculum", action="store_true",
        help=f"one table for the paper's stages: {', '.join(CURRICULUM)} (experiments/)",
    )  # fmt: skip
    p.add_argument("--chips", type=int, required=True, help="number of chips (devices), N")
    p.add_argument(
        "--chip", required=True, choices=sorted(CHIPS),
        help="; ".join(
            f"{k}: {c.name} {c.peak_flops / 1e12:.0f} TFLOP/s, {c.hbm_bytes / GB:.0f} GB"
            for k, c in CHIPS.items()
        ) + " (vendor peaks, assumed)",
    )  # fmt: skip
    p.add_argument(
        "--mfu", type=float, default=0.40,
        help="assumed model FLOPs utilisation, in (0, 1] (default 0.40)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, help="global batch per step (default: the config's)")
    p.add_argument(
        "--steps", type=int,
        help="optimizer steps (default: the config's optim.total_steps, which for base_256 and "
        "base_512 are the paper's 600k and 200k)",
    )  # fmt: skip
    p.add_argument(
        "--mesh", help="replace the config's mesh, e.g. data=-1,fsdp=8 (-1 fills the chips)"
    )
    p.add_argument(
        "--compile", action="store_true",
        help=f"measure activation memory now: compile the step on {COMPILE_DEVICES} simulated "
        "devices (minutes per stage, a few GB of RAM) instead of the stored constants",
    )  # fmt: skip
    p.add_argument(
        "--count-remat", action="store_true",
        help="count the recomputation of remat in the FLOPs (hardware FLOPs; --mfu then means "
        "hardware utilisation)",
    )  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON to PATH")
    return p


def check(args: argparse.Namespace) -> None:
    """Raise ValueError naming the fix for arguments that cannot make a plan."""
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: an MFU is a fraction in (0, 1], e.g. --mfu 0.4")
    if args.chips < 1:
        raise ValueError(f"--chips {args.chips}: give the number of chips, at least 1")
    for name in ("batch", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be a positive integer")
    if args.curriculum and args.steps is not None:
        raise ValueError("--steps applies to one stage: use it with --config, not --curriculum")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        check(args)
    except ValueError as e:
        p.error(str(e))
    if args.compile:  # before jax starts its CPU backend
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flag = f"--xla_force_host_platform_device_count={COMPILE_DEVICES}"
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    chip = CHIPS[args.chip]
    try:
        mesh = parse_mesh(args.mesh) if args.mesh else None
        specs = [f"experiments/{s}.py" for s in CURRICULUM] if args.curriculum else [args.config]
        stages = [
            stage_from_config(
                config_lib.load(s), args.chips, batch=args.batch, steps=args.steps, mesh=mesh
            )
            for s in specs
        ]
    except ValueError as e:
        p.error(str(e))
    rows = []
    for stage in stages:
        print(f"lowering {stage.name} ...", file=sys.stderr, flush=True)
        rows.append(
            plan_stage(
                stage, chip, args.chips, args.mfu, compile=args.compile,
                count_remat=args.count_remat,
            )
        )  # fmt: skip
    print(format_plan(rows, chip, args.chips, args.mfu))
    if args.json:
        out = {
            "chip": dataclasses.asdict(chip) | {"key": args.chip, "peaks": "vendor, assumed"},
            "chips": args.chips,
            "mfu_assumed": args.mfu,
            "stages": rows,
            "total": {
                "wall_days": sum(r["wall_days"] for r in rows),
                "chip_hours": sum(r["chip_hours"] for r in rows),
            },
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
