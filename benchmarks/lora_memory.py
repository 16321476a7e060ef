"""Memory of the full-size SDXL LoRA train step on one device, from XLA's compiled plan (CPU).

python benchmarks/lora_memory.py [--rank 32] [--groups attn] [--side 1024] [--no-remat]

The step is lowered on abstract inputs (nothing allocated) for one device at batch 1 and 2:
the compiler's temporaries give one sample's activation bytes (the difference) and the fixed
rest; the arguments are the frozen base in bf16, the adapters' state (fp32 params, Adam mu and
nu, EMA) and the batch. Prints the per-device total per batch and the largest batch that fits a
24 GB and an 80 GB card (the plan of the CPU compiler: a GPU's differs by its fusion choices),
beside the same numbers for the full fine-tune step when --full is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax

from sdxl_jax import sharding as sh
from sdxl_jax.models.lora import LoRAConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.train import lowering

GB = 1e9


def plan(unet: UNetConfig, side: int, lora: LoRAConfig | None) -> dict:
    mesh = sh.make_mesh({"fsdp": 1}, jax.devices()[:1])
    latent = (side // 8, side // 8)
    out = {}
    for batch in (1, 2):
        t = time.perf_counter()
        lowered, state = lowering.lower_train_step(unet, latent, batch, mesh, remat=unet.remat,
                                                   lora=lora)  # fmt: skip
        mem = lowered.compile().memory_analysis()
        out[batch] = dict(
            temp=mem.temp_size_in_bytes,
            args=mem.argument_size_in_bytes,
            outputs=mem.output_size_in_bytes,
            alias=mem.alias_size_in_bytes,
            compile_s=time.perf_counter() - t,
        )
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    per_sample = (out[2]["temp"] + out[2]["args"]) - (out[1]["temp"] + out[1]["args"])
    fixed = out[1]["temp"] + out[1]["args"] - per_sample
    # Outputs alias the donated state, so arguments + temporaries bound the peak.
    fits = {f"max_batch_{g}gb": max(0, int((g * GB - fixed) // per_sample)) for g in (24, 80)}
    return dict(
        trained_params=int(trained),
        per_sample_gb=per_sample / GB,
        fixed_gb=fixed / GB,
        batch1_gb=(out[1]["temp"] + out[1]["args"]) / GB,
        compile_s=[round(o["compile_s"], 1) for o in out.values()],
        raw=out,
        **fits,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--groups", default="attn")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--full", action="store_true", help="also the full fine-tune step")
    ap.add_argument("--preset", default="sdxl_base")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    unet = dataclasses.replace(getattr(UNetConfig, args.preset)(), remat=not args.no_remat)
    lora = LoRAConfig(rank=args.rank, groups=tuple(args.groups.split(",")))
    rows = {"lora": plan(unet, args.side, lora)}
    if args.full:
        rows["full"] = plan(unet, args.side, None)
    for name, r in rows.items():
        print(
            f"{name}: trained params {r['trained_params']:,}; fixed {r['fixed_gb']:.2f} GB + "
            f"{r['per_sample_gb']:.2f} GB per sample; batch 1 {r['batch1_gb']:.2f} GB; max batch "
            f"24 GB {r['max_batch_24gb']}, 80 GB {r['max_batch_80gb']}; compile {r['compile_s']} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
