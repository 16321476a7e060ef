"""Inspect checkpoints and presets; convert between diffusers folders and single files.

python -m sdxl_jax.convert inspect --preset sdxl_base  # exact parameter counts, no allocation
python -m sdxl_jax.convert inspect PATH                    # what a checkpoint holds (headers only)
python -m sdxl_jax.convert export PATH --to OUT --format diffusers|single-file [--dtype fp16]
python -m sdxl_jax.convert merge-lora PATH --lora LORA[:SCALE] ... --to OUT [--format ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax import workdir

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TO_HELP = "output: a new or empty folder (diffusers) or a new .safetensors file; never overwritten"


def presets() -> dict[str, dict[str, Any]]:
    """Named model sets: whole SDXL pipelines, single components, and tiny test sizes."""
    from sdxl_jax.models.clip import CLIPTextConfig
    from sdxl_jax.models.unet import UNetConfig
    from sdxl_jax.models.vae import VAEConfig

    return {
        "sdxl_base": {
            "unet": UNetConfig.sdxl_base(),
            "vae": VAEConfig.sdxl(),
            "text_encoder": CLIPTextConfig.clip_l(),
            "text_encoder_2": CLIPTextConfig.open_clip_bigg(),
        },
        "sdxl_refiner": {
            "unet": UNetConfig.sdxl_refiner(),
            "vae": VAEConfig.sdxl(),
            "text_encoder_2": CLIPTextConfig.open_clip_bigg(),
        },
        "sdxl_vae": {"vae": VAEConfig.sdxl()},
        "clip_l": {"text_encoder": CLIPTextConfig.clip_l()},
        "open_clip_bigg": {"text_encoder_2": CLIPTextConfig.open_clip_bigg()},
        "tiny": {
            "unet": UNetConfig.tiny(),
            "vae": VAEConfig.tiny(),
            "text_encoder": CLIPTextConfig.tiny(),
            "text_encoder_2": CLIPTextConfig.tiny_bigg(),
        },
    }


def preset_counts(name: str) -> dict[str, tuple[str, int]]:
    """Per component: module class and exact parameter count, built abstractly."""
    from sdxl_jax.weights.components import COMPONENTS
    from sdxl_jax.weights.mapping import count_params

    table = presets()
    if name not in table:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(table)}")
    out = {}
    for comp, cfg in table[name].items():
        abstract = COMPONENTS[comp].abstract(cfg)
        out[comp] = (type(abstract).__name__, count_params(abstract))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.preset:
        rows = preset_counts(args.preset)
        if args.json:
            print(json.dumps({k: {"class": c, "parameters": n} for k, (c, n) in rows.items()}))
            return 0
        print(f"preset {args.preset} (built abstractly; nothing allocated)")
        print(f"{'component':<16}{'class':<28}{'parameters':>14}  {'':>15}  fp32 / bf16 size")
        for comp, (cls, n) in rows.items():
            print(f"{comp:<16}{cls:<28}{n:>14d}  ({n:>13,})  {_gb(4 * n)} / {_gb(2 * n)}")
        total = sum(n for _, n in rows.values())
        if len(rows) > 1:
            print(f"{'total':<44}{total:>14d}  ({total:>13,})  {_gb(4 * total)} / {_gb(2 * total)}")
        return 0
    if not args.path:
        raise SystemExit("inspect needs a PATH or --preset NAME")
    from sdxl_jax.weights.formats import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']}" + (f" ({info['model']})" if "model" in info else ""))
    for name, c in info["components"].items():
        dts = ", ".join(f"{d} x{n}" for d, n in sorted(c["dtypes"].items()))
        cls = f"  {c['class']}" if "class" in c else ""
        cls += f"  config: {c['config']}" if "config" in c else ""
        print(
            f"  {name:<16}{c['parameters']:>14d} params  {c['tensors']:>5} tensors  "
            f"{_gb(c['bytes'])}  [{dts}]{cls}"
        )
    if info.get("extras"):
        print(f"  also: {', '.join(info['extras'])}")
    return 0


def check_new_output(to: str | Path, fmt: str) -> None:
    """Nothing is overwritten: ``--to`` must not exist yet, or be an empty folder (diffusers)."""
    to = Path(to)
    if to.is_dir() and fmt == "diffusers":
        if any(to.iterdir()):
            raise ValueError(
                f"--to {to} is a folder that is not empty: give a new or an empty folder "
                f"(nothing is overwritten)"
            )
    elif to.exists() or to.is_symlink():
        raise ValueError(f"--to {to} exists: give a new path (nothing is overwritten)")


def cmd_export(args: argparse.Namespace) -> int:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    from sdxl_jax.weights import formats

    check_new_output(args.to, args.format)  # before minutes of loading
    dtype = np.dtype(DTYPES[args.dtype]) if args.dtype else None
    src = Path(args.path)
    t0 = time.perf_counter()
    comps = args.components.split(",") if args.components else None
    # Load straight into the export dtype: no full-precision copy is ever held.
    param_dtype = dtype if dtype is not None else np.float32
    models = formats.load(src, comps, param_dtype=param_dtype, progress=True)
    t1 = time.perf_counter()
    print(f"loaded {', '.join(models)} from {src} in {t1 - t0:.1f} s", file=sys.stderr)
    shard = int(args.max_shard_gb * 1e9) or None
    formats.save(
        models,
        args.to,
        args.format,
        dtype=dtype,
        max_shard_bytes=shard,
        copy_from=src,
        progress=True,
    )
    print(f"wrote {args.to} ({args.format}) in {time.perf_counter() - t1:.1f} s", file=sys.stderr)
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from sdxl_jax.inference import checkpoints
    from sdxl_jax.inference import loras as loras_lib
    from sdxl_jax.weights import formats

    src, out = Path(args.path), Path(args.to)
    check_new_output(out, args.format)
    info = checkpoints.check_stage(src, need_vae=False)
    specs = [loras_lib.parse_spec(x) for x in args.lora]
    # Every LoRA read and checked against the configs before any weights load.
    checked = loras_lib.check(specs, info, strict=args.lora_strict)
    t0 = time.perf_counter()
    models = formats.load(src, progress=True)
    loras_lib.merge_into(models, checked)
    formats.save(models, out, args.format, copy_from=src, progress=True)
    names = ", ".join(f"{lo.loaded.path.name} x {lo.scale:g}" for lo in checked)
    print(f"merged {names} into {out} ({args.format}) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)  # fmt: skip
    return 0


def _shard_gb(text: str) -> float:
    try:
        gb = float(text)
    except ValueError:
        gb = float("nan")
    if not gb >= 0 or gb == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: need a number of GB >= 0")
    return gb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("inspect", help="parameter counts of a preset, or what a checkpoint holds")
    pi.add_argument("path", nargs="?", help="a diffusers folder or a .safetensors single file")
    pi.add_argument(
        "--preset",
        help="sdxl_base, sdxl_refiner, sdxl_vae, clip_l, open_clip_bigg or tiny",
    )
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(fn=cmd_inspect)
    pe = sub.add_parser(
        "export",
        help="convert a checkpoint (diffusers folder or single file) to either format",
        description="Loads through sdxl_jax's modules (so the weights are checked against the "
        "architecture) and writes a diffusers folder or an sgm single file.",
    )
    pe.add_argument("path", help="source: a diffusers folder or a .safetensors single file")
    pe.add_argument("--to", required=True, help=TO_HELP)
    pe.add_argument("--format", required=True, choices=["diffusers", "single-file"])
    pe.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep fp32)")
    pe.add_argument("--components", help="comma-separated subset, e.g. unet,vae")
    pe.add_argument(
        "--max-shard-gb",
        type=_shard_gb,
        default=10.0,
        help="diffusers shard size in GB (0: one file; default 10)",
    )
    pe.set_defaults(fn=cmd_export)
    pm = sub.add_parser(
        "merge-lora",
        help="bake LoRAs into a checkpoint (diffusers folder or single file)",
        description="Each LoRA (kohya or diffusers/PEFT file) is checked against the "
        "checkpoint's configs, then W += scale * alpha / rank * up @ down for every layer it "
        "adapts; the result samples as the base with --lora does.",
    )
    pm.add_argument("path", help="the base: a diffusers folder or a .safetensors single file")
    pm.add_argument("--lora", action="append", required=True, metavar="PATH[:SCALE]",
                    help="a LoRA file (repeat for several; scale default 1.0)")  # fmt: skip
    pm.add_argument("--to", required=True, help=TO_HELP)
    pm.add_argument("--format", default="diffusers", choices=["diffusers", "single-file"])
    pm.add_argument("--lora-strict", action=argparse.BooleanOptionalAction, default=True,
                    help="refuse LoRA keys that match no layer (default)")  # fmt: skip
    pm.set_defaults(fn=cmd_merge_lora)
    args = p.parse_args(argv)
    if (
        args.command in ("export", "merge-lora")
        and args.format == "single-file"
        and not args.to.endswith(".safetensors")
    ):
        p.error("--to must end in .safetensors for --format single-file")
    try:
        if args.command in ("export", "merge-lora"):
            workdir.local_only(args.to, "--to")
        return args.fn(args)
    except (ValueError, OSError) as e:  # FileNotFoundError, PermissionError, ... included
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
