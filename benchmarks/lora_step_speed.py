"""The tiny LoRA train step against the tiny full fine-tune step, side by side, on this machine.

python benchmarks/lora_step_speed.py [--batch 32] [--side 64] [--rank 8] [--groups attn,ff]
                                     [--repeats 30]

Both steps take the same cached batch (latents + text embeddings) through the same UNet (the
tiny preset, fp32 on CPU), AdamW + EMA; the LoRA step trains only the adapters over the frozen
base. Alternating timed runs (median of ``--repeats`` each) keep the machine's noise out of
the ratio. Also prints compile times and trained parameter counts.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.models import lora
from sdxl_jax.models.unet import UNet2DConditionModel, UNetConfig
from sdxl_jax.train import state as state_lib
from sdxl_jax.train import step as step_lib


def batch(n: int, side: int, cfg: UNetConfig) -> dict:
    r = np.random.default_rng(0)
    h = side // 4  # the tiny VAE's factor
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {
        "latent_mean": jnp.asarray(r.standard_normal((n, h, h, 4)), jnp.float32),
        "latent_logvar": jnp.full((n, h, h, 4), -4.0, jnp.float32),
        "context": jnp.asarray(r.standard_normal((n, 77, cfg.cross_attention_dim)), jnp.float32),
        "pooled": jnp.asarray(r.standard_normal((n, pooled)), jnp.float32),
        "original_size": jnp.full((n, 2), side, jnp.float32),
        "crop_coords_top_left": jnp.zeros((n, 2), jnp.float32),
        "target_size": jnp.full((n, 2), side, jnp.float32),
    }


def make_step(unet: nnx.Module):
    graphs, params, frozen = step_lib.split_models(unet)
    optimizer = state_lib.make_optimizer(1e-4, 10, 1000)
    state = state_lib.init_state(params, optimizer, 0)
    fn = jax.jit(
        functools.partial(
            step_lib.train_step,
            graphs=graphs,
            cfg=step_lib.StepConfig(compute_dtype="float32"),
            optimizer=optimizer,
        ),
        donate_argnums=0,
    )
    return fn, state, frozen, sum(x.size for x in jax.tree.leaves(params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--groups", default="attn,ff")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    cfg = UNetConfig.tiny()
    data = batch(args.batch, args.side, cfg)
    runs = {}
    for name in ("full", "lora"):
        unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
        if name == "lora":
            config = lora.LoRAConfig(rank=args.rank, groups=tuple(args.groups.split(",")))
            lora.attach(unet, config, nnx.Rngs(1))
        fn, state, frozen, n = make_step(unet)
        t = time.perf_counter()
        state, m = fn(state, data, frozen)
        jax.block_until_ready(m)
        runs[name] = {"fn": fn, "state": state, "frozen": frozen, "params": n,
                      "compile_s": time.perf_counter() - t, "times": []}  # fmt: skip
    for _ in range(args.repeats):
        for r in runs.values():
            t = time.perf_counter()
            r["state"], m = r["fn"](r["state"], data, r["frozen"])
            jax.block_until_ready(m)
            r["times"].append(time.perf_counter() - t)
    med = {k: statistics.median(r["times"]) for k, r in runs.items()}
    for k, r in runs.items():
        print(
            f"{k:5s}: trained params {r['params']:>9,}  compile {r['compile_s']:5.1f} s  "
            f"step {1000 * med[k]:7.1f} ms  ({args.batch / med[k]:6.1f} img/s)"
        )
    print(f"LoRA step / full step time: {med['lora'] / med['full']:.2f}x")


if __name__ == "__main__":
    main()
