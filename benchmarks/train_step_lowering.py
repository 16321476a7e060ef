"""Full-size SDXL base train step at 1024^2, lowered and compiled for a simulated 8-device FSDP
mesh on abstract inputs: nothing is allocated. Reports the time to lower and compile, XLA's
FLOPs per sample (against SPEC's analytic 20.3 TFLOP) and the per-device memory XLA plans for.

    python benchmarks/train_step_lowering.py [--batch 8] [--fsdp 8] [--no-remat] [--no-compile]

FLOPs come from lowering a copy with every scanned stack unrolled (XLA's cost analysis counts a
scan body once); memory from compiling the scanned program as training would run it. The step
is built by ``sdxl_jax.train.lowering.lower_train_step``, which ``python -m sdxl_jax.plan``
also uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    p.add_argument("--fsdp", type=int, default=8, help="devices, all on the fsdp axis (8)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    p.add_argument("--no-remat", action="store_true", help="keep activations (no recompute)")
    p.add_argument("--no-compile", action="store_true", help="lower only (FLOPs)")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.fsdp}"
    )

    import jax

    from sdxl_jax import sharding as sh
    from sdxl_jax.models.unet import UNetConfig
    from sdxl_jax.train.lowering import lower_train_step, xla_flops
    from sdxl_jax.train.state import make_optimizer

    mesh = sh.make_mesh({"fsdp": args.fsdp})
    h = args.size // 8
    b = args.batch
    optimizer = make_optimizer(lr=1e-4, warmup_steps=1000, total_steps=600_000)

    def lowered(unroll: bool):
        return lower_train_step(
            UNetConfig.sdxl_base(), (h, h), b, mesh, remat=not args.no_remat, unroll=unroll,
            optimizer=optimizer,
        )  # fmt: skip

    t0 = time.perf_counter()
    low_unrolled, state = lowered(unroll=True)
    t_lower_unrolled = time.perf_counter() - t0
    flops = xla_flops(low_unrolled)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"UNet parameters: {n_params:,}; mesh {dict(mesh.shape)}; global batch {b}; "
          f"{args.size}^2 (latents {h}^2); remat {not args.no_remat}")  # fmt: skip
    print(f"lowered (unrolled, for FLOPs) in {t_lower_unrolled:.1f} s")
    # Partitioned HLO cost analysis is per device before SPMD partitioning: the whole program.
    print(f"XLA FLOPs per step {flops / 1e12:.2f} TFLOP = {flops / b / 1e12:.2f} TFLOP per "
          f"sample (SPEC analytic without recomputation: 20.3)")  # fmt: skip
    if args.no_compile:
        return
    t0 = time.perf_counter()
    low, _ = lowered(unroll=False)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = low.compile()
    t_compile = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gb = 1e9
    print(f"lowered (scanned) in {t_lower:.1f} s, compiled in {t_compile:.1f} s")
    print(
        f"per-device memory plan: arguments {m.argument_size_in_bytes / gb:.2f} GB, outputs "
        f"{m.output_size_in_bytes / gb:.2f} GB (aliased {m.alias_size_in_bytes / gb:.2f} GB), "
        f"temporaries {m.temp_size_in_bytes / gb:.2f} GB; peak about "
        f"{(m.argument_size_in_bytes + m.temp_size_in_bytes) / gb:.2f} GB"
    )


if __name__ == "__main__":
    main()
