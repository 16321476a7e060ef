"""PyTorch baseline of the SDXL train step: diffusers' UNet, bf16 autocast, SDPA, fused AdamW, EMA.

sdxl_jax.train.step.train_step on cached latents (issue 17, item 1b) in PyTorch: diffusers'
UNet2DConditionModel from the same UNetConfig (sdxl_jax.weights.configs.unet_to_reference), fp32
random weights made on the device; inputs shaped as sdxl_jax.train.lowering.abstract_batch, made
on the device. Per step, as ours: posterior sample, guidance dropout, t ~ U{t_min..t_max-1}, noise,
x_t on the SDXL schedule, forward under autocast, epsilon MSE in fp32, backward, global-norm
clipping, AdamW with make_optimizer's defaults (lr 1e-4; a non-finite loss or norm skips the
update via fused AdamW's found_inf, no host sync), the fp32 EMA lerped with StepConfig's decay
min(0.9999, (1 + n) / (10 + n)).

    # GPU: full SDXL base at 1024^2, checkpointing off and on, within 4 minutes
    python benchmarks/torch_train_step_speed.py --preset sdxl --batch 1,4,8 \\
        --checkpointing off,on --deadline-s 240 --json $OUT/torch_train_step.json
    # the refiner, torch.compile'd (FLOPs/sample: the torch count, or --flops-per-sample)
    python benchmarks/torch_train_step_speed.py --preset refiner --batch 4 --checkpointing off \\
        --compile
    # CPU smoke: tiny UNet, 64 px, batches 1 and 2, checkpointing off and on, one thread
    python benchmarks/torch_train_step_speed.py --smoke --json /tmp/tts.json

Per configuration (--batch x --checkpointing): the first step alone (with torch.compile, cuDNN
autotuning, the optimizer state's allocation), --warmup - 1 more, then --steps steps each timed
to a sync. MFU = FLOPs/sample x images/s / --peak-tflops; FLOPs/sample: --flops-per-sample, else
20.23e12 (our XLA count) for sdxl at 1024^2, else the torch count: FlopCounterMode over one
forward + backward on the meta device (sdxl at 1024^2: 20.23e12 too). Batches above one that ran
out of memory are skipped, and everything once --deadline-s (counted from after torch's import)
is near. --json is rewritten after every configuration. --compile with checkpointing compiles
far slower (tiny UNet, busy CPU: first step 17 s off, 507 s on).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # sdxl_jax's configs import jax: keep it off the GPU

BASE_FLOPS_1024 = 20.23e12  # XLA's count of our base step per 1024^2 sample (BENCHMARKS.md)
LR = 1e-4  # lower_train_step's optimizer
PRESETS = ("sdxl", "refiner", "tiny")


# -- configs and inputs ------------------------------------------------------------------------
def configs_for(preset: str) -> tuple[Any, Any, dict[str, Any]]:
    """(UNetConfig, StepConfig, diffusers config.json dict): the same model on both sides."""
    from sdxl_jax.models.unet import UNetConfig
    from sdxl_jax.train.step import StepConfig
    from sdxl_jax.weights.configs import unet_to_reference

    make = {"sdxl": UNetConfig.sdxl_base, "refiner": UNetConfig.sdxl_refiner}
    cfg = make.get(preset, UNetConfig.tiny)()
    step = StepConfig.for_refiner() if preset == "refiner" else StepConfig()
    return cfg, step, unet_to_reference(cfg)


def make_batch(cfg: Any, step_cfg: Any, px: int, b: int, device: Any) -> dict[str, Any]:
    """Random cached-latent inputs on ``device``, shaped as abstract_batch (latents NCHW)."""
    from sdxl_jax.train.lowering import abstract_batch

    shapes = abstract_batch(cfg, (px // 8, px // 8), b, refiner=step_cfg.refiner)
    n, h, w, c = shapes["latent_mean"].shape
    f16 = dict(device=device, dtype=torch.float16)
    sizes = [px, px, 0, 0] + ([step_cfg.aesthetic_score] if step_cfg.refiner else [px, px])
    p = shapes["pooled"].shape[1]
    assert p + len(sizes) * cfg.addition_time_embed_dim == cfg.projection_class_embeddings_input_dim
    return dict(latent_mean=torch.randn((n, c, h, w), **f16),
                latent_logvar=torch.randn((n, c, h, w), **f16) * 0.1 - 4.0,
                context=torch.randn(shapes["context"].shape, **f16),
                pooled=torch.randn(shapes["pooled"].shape, **f16),
                time_ids=torch.tensor(sizes, device=device).float().expand(b, -1))  # fmt: skip


def build_unet(ref_cfg: dict[str, Any], device: Any, attention: str) -> Any:
    """diffusers' UNet with fp32 random weights made on ``device``."""
    import diffusers

    with torch.device(device):
        unet = diffusers.UNet2DConditionModel.from_config(ref_cfg)
    if attention == "default":  # diffusers' AttnProcessor: bmm + softmax, no fused kernel
        unet.set_default_attn_processor()
    return unet.float().train()


# -- the step ----------------------------------------------------------------------------------
def unet_loss(model: Any, batch: dict[str, Any], step_cfg: Any, abar: Any, dtype: Any) -> Any:
    """The epsilon MSE (fp32) of one randomly noised batch, as sdxl_jax.train.step.loss_fn."""
    mean = batch["latent_mean"].float()
    x0 = mean + torch.exp(0.5 * batch["latent_logvar"].float()) * torch.randn_like(mean)
    b, dev = x0.shape[0], x0.device
    t = torch.randint(step_cfg.t_min, step_cfg.t_max, (b,), device=dev)
    noise = torch.randn_like(x0)  # StepConfig.offset_noise is 0
    a = abar[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
    keep = (torch.rand(b, device=dev) >= step_cfg.cond_dropout).float()  # guidance dropout
    context = batch["context"].float() * keep[:, None, None]
    pooled = batch["pooled"].float() * keep[:, None]
    cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
    mixed = dtype != torch.float32  # (autocast refuses the meta device, even disabled)
    with torch.autocast(dev.type, dtype=dtype) if mixed else contextlib.nullcontext():
        pred = model(x_t, t, context, added_cond_kwargs=cond).sample
    return F.mse_loss(pred.float(), noise)


def make_step(model: Any, params: list, ema: list, opt: Any, args: argparse.Namespace) -> Any:
    """step(batch, n) -> (loss, grad norm): one optimizer call and EMA update at step n."""
    step_cfg, clip = args.step_cfg, args.clip_norm
    abar = torch.tensor(step_cfg.schedule.alphas_cumprod, dtype=torch.float32, device=args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    fused = bool(opt.defaults.get("fused"))

    def step(batch: dict[str, Any], n: int) -> tuple[Any, Any]:
        loss = unet_loss(model, batch, step_cfg, abar, dtype)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"), foreach=True)
        if fused:  # skip a non-finite update on the device, as update_if_finite does
            opt.found_inf = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = step_cfg.ema_decay  # with ema_decay_at's warm-up
        decay = min(decay, (1.0 + n) / (10.0 + n)) if step_cfg.ema_warmup else decay
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        return loss.detach(), norm.detach()

    return step


def time_steps(step: Any, batch: dict, args: argparse.Namespace) -> dict[str, Any]:
    """The first step alone, the rest of the warm-up, then --steps steps each to a sync."""

    sync = torch.cuda.synchronize if args.device.type == "cuda" else lambda: None
    t0 = time.perf_counter()
    out = step(batch, 0)
    sync()
    first = time.perf_counter() - t0
    for n in range(1, args.warmup):
        out = step(batch, n)
    sync()
    times = []
    for n in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        out = step(batch, n)
        sync()
        times.append(time.perf_counter() - t0)
    loss, norm = (float(x) for x in out)
    return dict(first_step_s=first, step_ms=[1e3 * t for t in times], loss=loss, grad_norm=norm)


# -- one configuration -------------------------------------------------------------------------
def run_config(unet: Any, params: list, ema: list, opt: Any, row: dict, args: Any) -> None:
    """Fill ``row`` with the timings of one (batch, checkpointing) configuration."""
    on = row["checkpointing"]
    (unet.enable_gradient_checkpointing if on else unet.disable_gradient_checkpointing)()
    model = unet
    if args.compile:
        torch._dynamo.reset()  # a fresh compile per configuration, timed in its first step
        model = torch.compile(unet, dynamic=False)
    batch = make_batch(args.unet_cfg, args.step_cfg, args.resolution, row["batch"], args.device)
    row.update(time_steps(make_step(model, params, ema, opt, args), batch, args))
    median = statistics.median(row["step_ms"])
    row["step_ms_median"], row["step_ms_mean"] = median, statistics.mean(row["step_ms"])
    row["images_per_s"] = 1e3 * row["batch"] / median
    if args.flops_per_sample:
        tflops = args.flops_per_sample * row["images_per_s"] / 1e12
        row["model_tflops_per_s"], row["mfu"] = tflops, tflops / args.peak_tflops


def measure(unet: Any, params: list, ema: list, opt: Any, row: dict, args: Any) -> None:
    """run_config, with out-of-memory and other failures recorded in ``row``; memory freed."""
    on_gpu = args.device.type == "cuda"
    row["peak_allocated_bytes"] = row["peak_reserved_bytes"] = None  # stays None on a CPU
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        run_config(unet, params, ema, opt, row, args)
        row["status"] = "ok"
    except Exception as e:  # a failed configuration must not end the run
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
        row["status"] = "oom" if oom else "error"
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:500]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if on_gpu:
        torch.cuda.synchronize()
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        torch.cuda.empty_cache()
    row["config_s"] = time.perf_counter() - t0


# -- FLOPs -------------------------------------------------------------------------------------
def count_flops(args: argparse.Namespace) -> dict[str, Any]:
    """torch's FlopCounterMode over one forward + backward at batch 1 on the meta device (no
    memory, no compute; gradient checkpointing off: model FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    t0 = time.perf_counter()
    meta = torch.device("meta")
    unet = build_unet(args.ref_cfg, meta, args.attention)
    batch = make_batch(args.unet_cfg, args.step_cfg, args.resolution, 1, meta)
    abar = torch.ones(args.step_cfg.schedule.num_train_timesteps, device=meta)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = unet_loss(unet, batch, args.step_cfg, abar, torch.float32)
        forward = counter.get_total_flops()
        loss.backward()
    how = "torch.utils.flop_counter.FlopCounterMode, forward + backward, meta device, batch 1"
    total, seconds = float(counter.get_total_flops()), time.perf_counter() - t0
    return dict(per_sample=total, forward_per_sample=float(forward), how=how, seconds=seconds)


def pick_flops(args: argparse.Namespace, counted: dict | None) -> tuple[float | None, str]:
    if args.flops_per_sample:
        return args.flops_per_sample, "--flops-per-sample"
    if args.preset == "sdxl" and args.resolution == 1024:
        return BASE_FLOPS_1024, "sdxl_jax lowering (XLA count, 20.23 TFLOP per 1024^2 sample)"
    if counted:
        return counted["per_sample"], "torch FlopCounterMode count (meta device)"
    return None, "none: no MFU"


# -- driver ------------------------------------------------------------------------------------
def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    gpu, b = args.device.type == "cuda", torch.backends.cuda
    kinds = ("flash", "mem_efficient", "cudnn", "math")
    sdpa = {k: getattr(b, f"{k}_sdp_enabled")() for k in kinds}
    return dict(device=torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
                torch=torch.__version__, diffusers=diffusers.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if gpu else None,
                sdpa_backends=sdpa if gpu else None, tf32_matmul=b.matmul.allow_tf32,
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                python=platform.python_version(), threads=torch.get_num_threads())  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add = p.add_argument
    add("--preset", choices=PRESETS, default="sdxl", help="default sdxl (the base)")
    add("--resolution", type=int, help="square image side in pixels (default 1024; tiny 64)")
    add("--batch", help="comma-separated batch sizes (default 1,4,8; smoke 1,2)")
    add("--checkpointing", default="off,on", help="off, on or both (default off,on)")
    add("--attention", choices=("sdpa", "default"), default="sdpa",
        help="sdpa: AttnProcessor2_0 (torch SDPA); default: diffusers' AttnProcessor")  # fmt: skip
    add("--compile", action="store_true", help="torch.compile the UNet (dynamic=False)")
    add("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype (bf16)")
    add("--adamw", choices=("fused", "foreach"), default="fused", help="default fused")
    add("--warmup", type=int, default=2, help="steps before the timed ones, the first incl. (2)")
    add("--steps", type=int, default=10, help="timed steps (default 10)")
    add("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (989: H100/H200 SXM)")
    add("--flops-per-sample", type=float, help="model FLOPs per sample for MFU (see above)")
    add("--count-flops", action=argparse.BooleanOptionalAction, default=True,
        help="count FLOPs with FlopCounterMode on the meta device (default on)")  # fmt: skip
    add("--deadline-s", type=float, help="seconds for the whole run; later configs skipped")
    add("--json", type=Path, help="write (and rewrite after each configuration) results here")
    add("--seed", type=int, default=0)
    add("--smoke", action="store_true", help="CPU, tiny, 64 px, batches 1,2, 2 timed steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.resolution = "tiny", 64
        args.batch = args.batch or "1,2"
        args.warmup, args.steps = 1, 2
    args.batch = args.batch or "1,4,8"
    args.resolution = args.resolution or (64 if args.preset == "tiny" else 1024)
    args.batches = [int(b) for b in args.batch.split(",")]
    modes = {"on": True, "off": False}
    if not set(args.checkpointing.split(",")) <= set(modes):
        p.error(f"--checkpointing: on, off or off,on; got {args.checkpointing!r}")
    args.ckpt_modes = [modes[m] for m in args.checkpointing.split(",")]
    if args.resolution % 64 or min(args.batches) < 1 or args.warmup < 1 or args.steps < 1:
        p.error("--resolution must be a multiple of 64; --batch, --warmup, --steps >= 1")
    return args


def setup(args: argparse.Namespace) -> tuple[Any, list, list, Any]:
    """The UNet, its parameters, their EMA copy and the optimizer (state made at step 1)."""
    torch.manual_seed(args.seed)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions
    unet = build_unet(args.ref_cfg, args.device, args.attention)
    params = [p for p in unet.parameters() if p.requires_grad]
    args.attn_processors = sorted({type(a).__name__ for a in unet.attn_processors.values()})
    with torch.no_grad():
        ema = [p.detach().clone() for p in params]  # fp32
    from sdxl_jax.train.state import make_optimizer  # its defaults: betas, eps, decay, clip

    d = {k: p.default for k, p in inspect.signature(make_optimizer).parameters.items()}
    adamw = dict(lr=LR, betas=(d["b1"], d["b2"]), eps=d["eps"], weight_decay=d["weight_decay"])
    args.clip_norm = d["clip_norm"]
    opt = torch.optim.AdamW(params, **adamw, **{args.adamw: True})
    args.optimizer = {**adamw, "impl": args.adamw, "clip_norm": args.clip_norm}
    return unet, params, ema, opt


def row_line(r: dict[str, Any]) -> str:
    head = f"[torch] {r['preset']} b={r['batch']} ckpt={'on' if r['checkpointing'] else 'off'}"
    if r["status"] != "ok":
        return f"{head}: {r['status']} {r.get('error') or ''}".rstrip()
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    peak = r.get("peak_allocated_bytes")
    mem = f", peak {peak / 1e9:.1f} / {r['peak_reserved_bytes'] / 1e9:.1f} GB" if peak else ""
    return (f"{head}: first {r['first_step_s']:.2f} s, median {r['step_ms_median']:.1f} ms "
            f"(mean {r['step_ms_mean']:.1f}), {r['images_per_s']:.2f} img/s{mfu}{mem}, "
            f"loss {r['loss']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:  # checks the code, not the CPU: one thread stays fast on a busy machine
        torch.set_num_threads(1)
    args.unet_cfg, args.step_cfg, args.ref_cfg = configs_for(args.preset)
    counted = count_flops(args) if args.count_flops else None
    args.flops_per_sample, flops_source = pick_flops(args, counted)
    t0 = time.perf_counter()
    unet, params, ema, opt = setup(args)
    env = environment(args)
    settings = {k: v for k, v in vars(args).items() if not k.endswith("_cfg")}
    settings = json.loads(json.dumps(settings, default=str))
    settings.update(setup_s=time.perf_counter() - t0, params=sum(p.numel() for p in params),
                    flops_source=flops_source, flop_count=counted,
                    alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))  # fmt: skip
    print(f"[torch] {env}; {settings['params']:,} params; FLOPs/sample "
          f"{args.flops_per_sample} ({flops_source}); count {counted}", flush=True)  # fmt: skip
    doc = {"device": env["device"], "torch": env["torch"], "diffusers": env["diffusers"],
           "env": env, "settings": settings, "results": []}  # fmt: skip
    prev = None  # (config seconds, batch) of the last configuration run
    for ckpt in args.ckpt_modes:
        oom_batch = None
        for b in args.batches:
            row = dict(preset=args.preset, batch=b, checkpointing=ckpt, attention=args.attention,
                       compile=args.compile, resolution=args.resolution, status="skipped",
                       error=None)  # fmt: skip
            left = args.deadline_s - (time.perf_counter() - start) if args.deadline_s else None
            need = 1.5 * prev[0] * max(1.0, b / prev[1]) if prev else 0.0
            if oom_batch is not None and b > oom_batch:
                row["error"] = f"batch {oom_batch} ran out of memory"
            elif left is not None and left < need:
                row["error"] = f"deadline: {left:.0f} s left, ~{need:.0f} s needed"
            else:
                measure(unet, params, ema, opt, row, args)
                prev = (row["config_s"], b)
                oom_batch = b if row["status"] == "oom" else oom_batch
            doc["results"].append(row)
            print(row_line(row), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
