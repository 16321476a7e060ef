"""Seconds per image of SDXL text-to-image sampling: sdxl_jax (JAX) against diffusers (PyTorch).

Both implementations get random weights (no checkpoint files, no tokenizers) and the same
precomputed random text embeddings (context [B, 77, 2048], pooled [B, 1280] for SDXL; the tiny
widths for --preset tiny), the same initial noise, scheduler and settings. The timed part is the
denoising loop (the cond + uncond batch in one UNet call per step, then guidance and the sampler
step) plus the VAE decode to pixels, in fp32 for both (diffusers' SDXL VAE config has
force_upcast=True, so its pipeline upcasts the fp16 VAE to fp32 for the decode; ours always
decodes in fp32). Text encoding is excluded for both (a few ms).

    python benchmarks/sample_speed.py --preset tiny --impl both          # CPU smoke run
    python benchmarks/sample_speed.py --preset sdxl --impl both          # GPU: 1024^2, 30 steps

Each call is timed to the pixels on the host (np.asarray / output_type="np"). The first call is
reported on its own (for ours it includes XLA compilation of the loop and of the decode); then
--repeats calls are timed and their median reported. "UNet loop" is the same denoising loop
without the decode. With --impl both, each implementation runs in its own subprocess (diffusers
first, then ours), so JAX and PyTorch never share the GPU's memory.

Not a test: on a GPU the sdxl preset takes minutes. The numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPLS = ("diffusers", "ours")  # the order --impl both runs them in
DTYPES = ("bf16", "fp16", "fp32")
SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m")
TEXT_LEN = 77

DIFFUSERS_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


# -- models and inputs -------------------------------------------------------------------------
def preset_configs(preset: str) -> dict[str, Any]:
    """UNet and VAE configs, and the text widths they take, made mutually consistent."""
    from sdxl_jax.models.clip import CLIPTextConfig
    from sdxl_jax.models.unet import UNetConfig
    from sdxl_jax.models.vae import VAEConfig

    if preset == "sdxl":
        unet, vae = UNetConfig.sdxl_base(), VAEConfig.sdxl()
        text_l, text_g = CLIPTextConfig.clip_l(), CLIPTextConfig.open_clip_bigg()
    else:
        unet, vae = UNetConfig.tiny(), VAEConfig.tiny()
        text_l, text_g = CLIPTextConfig.tiny(), CLIPTextConfig.tiny_bigg()
    context = text_l.hidden_size + text_g.hidden_size  # both penultimate states, concatenated
    pooled = text_g.projection_dim
    vector = pooled + 6 * unet.addition_time_embed_dim  # base: 6 micro-conditioning numbers
    if (unet.cross_attention_dim, unet.projection_class_embeddings_input_dim) != (context, vector):
        raise ValueError(
            f"UNetConfig.{preset}() takes context {unet.cross_attention_dim} / vector "
            f"{unet.projection_class_embeddings_input_dim}, but the {preset} text encoders give "
            f"{context} / {vector}: the presets must fit together"
        )
    return dict(unet=unet, vae=vae, context=context, pooled=pooled)


def make_inputs(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """The same random embeddings and noise for both implementations (float32, host)."""
    from sdxl_jax.conditioning import base_time_ids

    rng = np.random.default_rng(args.seed)
    b, f = args.batch, cfg["vae"].downscale
    c = cfg["unet"].in_channels
    ids = base_time_ids((args.height, args.width), (0, 0), (args.height, args.width))
    return dict(
        context=rng.standard_normal((b, TEXT_LEN, cfg["context"]), np.float32),
        pooled=rng.standard_normal((b, cfg["pooled"]), np.float32),
        # SDXL base without a negative prompt: zeroed negative conditioning.
        neg_context=np.zeros((b, TEXT_LEN, cfg["context"]), np.float32),
        neg_pooled=np.zeros((b, cfg["pooled"]), np.float32),
        time_ids=np.ascontiguousarray(np.broadcast_to(ids, (b, 6)), np.float32),
        noise=rng.standard_normal((b, args.height // f, args.width // f, c), np.float32),  # NHWC
    )


# -- FLOPs -------------------------------------------------------------------------------------
def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    subs = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            x = getattr(x, "jaxpr", x)  # ClosedJaxpr -> Jaxpr
            if hasattr(x, "eqns"):
                subs.append(x)
    return subs


def jaxpr_flops(jaxpr: Any) -> float:
    """Multiply-add FLOPs (2 per MAC) of the matmuls and convolutions in a jaxpr."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            per_out = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
        subs = _sub_jaxprs(eqn.params)
        if not subs:
            continue
        if name == "cond":
            total += max(jaxpr_flops(s) for s in subs)
        elif name == "while":
            raise ValueError("a while loop: its trip count is unknown")
        else:  # scan runs its body `length` times; pjit, remat, custom_* once
            total += eqn.params.get("length", 1) * sum(jaxpr_flops(s) for s in subs)
    return total


def model_flops(cfg: dict[str, Any], batch: int, height: int, width: int) -> dict[str, float]:
    """FLOPs of one UNet call on the guidance batch (2 x batch) and of one VAE decode (batch),
    counted on the traced (never compiled) programs, with plain XLA attention (the same matmuls
    as any fused kernel's)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdxl_jax.weights.components import COMPONENTS

    f32 = jnp.float32
    unet_cfg = cfg["unet"].replace(attention_impl="xla")
    graph, state = nnx.split(COMPONENTS["unet"].abstract(unet_cfg, dtype=f32, param_dtype=f32))
    f = cfg["vae"].downscale
    n = 2 * batch
    lat = jax.ShapeDtypeStruct((n, height // f, width // f, unet_cfg.in_channels), f32)

    def unet(state, x, t, ctx, pooled, ids):
        return nnx.merge(graph, state)(x, t, ctx, pooled, ids)

    args = (
        lat,
        jax.ShapeDtypeStruct((n,), f32),
        jax.ShapeDtypeStruct((n, TEXT_LEN, cfg["context"]), f32),
        jax.ShapeDtypeStruct((n, cfg["pooled"]), f32),
        jax.ShapeDtypeStruct((n, 6), f32),
    )
    unet_flops = jaxpr_flops(jax.make_jaxpr(unet)(state, *args).jaxpr)
    vgraph, vstate = nnx.split(COMPONENTS["vae"].abstract(cfg["vae"], dtype=f32, param_dtype=f32))
    z = jax.ShapeDtypeStruct((batch, height // f, width // f, cfg["vae"].latent_channels), f32)
    vae_flops = jaxpr_flops(
        jax.make_jaxpr(lambda s, z: nnx.merge(vgraph, s).decode(z))(vstate, z).jaxpr
    )
    return {"unet_call_flops": unet_flops, "vae_decode_flops": vae_flops}


# -- timing ------------------------------------------------------------------------------------
def time_calls(
    tag: str, full: Any, unet_only: Any, repeats: int, first_call: Any = None
) -> dict[str, Any]:
    """The first call (reported alone; ``first_call`` if given, else ``full``), then ``repeats``
    timed calls of each; medians. ``unet_only`` returns the final latents (kept from its last
    call, for a sanity check)."""
    out = {}

    def timed(fn: Any, what: str) -> float:
        t0 = time.perf_counter()
        out["latents"] = fn()
        dt = time.perf_counter() - t0
        print(f"[{tag}] {what}: {dt:.3f} s", flush=True)
        return dt

    first = timed(first_call or full, "first call (denoise + decode)")
    runs = [timed(full, f"denoise + decode {i + 1}/{repeats}") for i in range(repeats)]
    unet_runs = [timed(unet_only, f"denoise only {i + 1}/{repeats}") for i in range(repeats)]
    latents = np.asarray(out["latents"], np.float32)
    return dict(
        first_call_s=first,
        runs_s=runs,
        unet_runs_s=unet_runs,
        median_s=statistics.median(runs),
        unet_median_s=statistics.median(unet_runs),
        latents_finite=bool(np.isfinite(latents).all()),
        latents_std=float(latents.std()),
    )


def pick_dtype(name: str | None, on_gpu: bool) -> str:
    return name or ("bf16" if on_gpu else "fp32")


# -- ours (JAX) --------------------------------------------------------------------------------
def random_params(module: Any, seed: int, sharding: Any) -> tuple[Any, Any]:
    """(graph, state) of an abstract module with its parameters made on the device: kernels
    uniform with std 1/sqrt(fan_in), norm scales 1, biases 0. Nothing is made on the host.

    Kernels come from a counter-based hash (murmur3's finaliser of index + seed): one small
    program per distinct shape, and on a CPU several times faster than jax.random's threefry.
    """
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    u32 = jnp.uint32

    @functools.cache
    def uniform(shape: tuple[int, ...], dtype: Any) -> Any:
        def make(seed, std):
            h = jax.lax.iota(u32, math.prod(shape)) * u32(0x9E3779B1) + seed
            h = (h ^ (h >> 16)) * u32(0x85EBCA6B)
            h = (h ^ (h >> 13)) * u32(0xC2B2AE35)
            h = h ^ (h >> 16)
            x = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) - 0.5  # U[-1/2, 1/2)
            return (x * (math.sqrt(12.0) * std)).reshape(shape).astype(dtype)

        return jax.jit(make, out_shardings=sharding)

    graph, state = nnx.split(module)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    leaves = []
    for i, (path, x) in enumerate(flat):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(x.shape)
        if name == "scale":
            leaves.append(jnp.ones(shape, x.dtype, device=sharding))
        elif name == "bias":
            leaves.append(jnp.zeros(shape, x.dtype, device=sharding))
        else:  # conv kernels [(L,) H, W, I, O], linear kernels [(L,) I, O]
            fan_in = math.prod(shape[-4:-1]) if len(shape) >= 4 else shape[-2]
            leaf_seed = np.uint32((seed * 1_000_003 + i * 0x27D4EB2F) % 2**32)
            leaves.append(uniform(shape, x.dtype)(leaf_seed, np.float32(fan_in**-0.5)))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, leaves))
    return graph, state


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before the backend starts
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sdxl_jax.diffusion.schedule import NoiseSchedule, sampler_steps
    from sdxl_jax.inference import checkpoints, runtime
    from sdxl_jax.weights.components import COMPONENTS

    dev = jax.devices()[0]
    on_gpu = jax.default_backend() == "gpu"
    dtype_name = pick_dtype(args.dtype, on_gpu)
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[dtype_name]
    cfg = preset_configs(args.preset)
    env = {
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    print(f"[ours] {env}", flush=True)

    mesh = runtime.make_mesh([dev])  # one device: the benchmark is per chip
    replicated = NamedSharding(mesh, P())
    t0 = time.perf_counter()

    def unet_graph(attention: str) -> Any:
        ucfg = cfg["unet"].replace(attention_impl=attention)
        return nnx.split(COMPONENTS["unet"].abstract(ucfg, dtype=dtype, param_dtype=dtype))[0]

    unet_abs = COMPONENTS["unet"].abstract(
        cfg["unet"].replace(attention_impl=args.attention), dtype=dtype, param_dtype=dtype
    )
    graph, unet_state = random_params(unet_abs, 2 * args.seed, replicated)
    vae_abs = COMPONENTS["vae"].abstract(cfg["vae"], dtype=jnp.float32, param_dtype=jnp.float32)
    vae_graph, vae_state = random_params(vae_abs, 2 * args.seed + 1, replicated)
    jax.block_until_ready((unet_state, vae_state))
    n_unet = sum(x.size for x in jax.tree.leaves(unet_state))
    n_vae = sum(x.size for x in jax.tree.leaves(vae_state))
    info = checkpoints.StageInfo(
        path=Path("<random>"),
        fmt="random",
        role="base",
        components=("unet", "vae"),
        configs={"unet": cfg["unet"], "vae": cfg["vae"]},
        force_zeros_for_empty_prompt=True,
        schedule=NoiseSchedule(),  # SDXL's: scaled_linear 0.00085 -> 0.012, leading, offset 1
    )

    def stage_runner(graph: Any) -> Any:
        # No text encoders: the benchmark feeds precomputed embeddings.
        return runtime.StageRunner(
            runtime.StageModels(info, graph, unet_state, None, None, None), mesh
        )

    runner = stage_runner(graph)
    vae = runtime.VAERunner(nnx.merge(vae_graph, vae_state), mesh)
    del vae_state, unet_abs, vae_abs
    setup_s = time.perf_counter() - t0
    print(
        f"[ours] random UNet ({n_unet:,} params, {dtype_name}) and VAE ({n_vae:,} params, fp32) "
        f"built on {dev.device_kind} in {setup_s:.1f} s",
        flush=True,
    )

    inp = make_inputs(args, cfg)
    p = sampler_steps(info.schedule, args.sampler, args.steps)

    def put(a):
        return jax.device_put(a, replicated)

    cond = runtime.Conditioning(
        put(inp["context"]),
        put(inp["pooled"]),
        put(inp["time_ids"]),
        put(inp["neg_context"]),
        put(inp["neg_pooled"]),
        put(inp["time_ids"]),
    )
    x = put(inp["noise"] * np.float32(p.init_scale))
    sample_key = jax.random.key(args.seed + 1)

    def unet_only():
        return jax.block_until_ready(runner.denoise(x, p, cond, args.guidance, sample_key))

    def full():
        images = vae.decode(runner.denoise(x, p, cond, args.guidance, sample_key))
        assert images.shape == (args.batch, args.height, args.width, 3), images.shape

    first_parts = {}

    def first_call():  # the same work as full(), its two compiled programs timed apart
        t0 = time.perf_counter()
        print("[ours] compiling and running the denoising loop", flush=True)
        latents = unet_only()
        first_parts["denoise_s"] = time.perf_counter() - t0
        print("[ours] compiling and running the VAE decode", flush=True)
        t0 = time.perf_counter()
        images = vae.decode(latents)
        first_parts["decode_s"] = time.perf_counter() - t0
        assert images.shape == (args.batch, args.height, args.width, 3), images.shape
        print(
            f"[ours] first call: denoise {first_parts['denoise_s']:.3f} s, decode "
            f"{first_parts['decode_s']:.3f} s (each includes its compilation)",
            flush=True,
        )

    # layers.attention's "auto": cuDNN's fused kernel on GPU for bf16/fp16, else XLA.
    fused = on_gpu and dtype_name != "fp32" and args.attention in ("auto", "cudnn")
    attention = "cuDNN fused" if fused else "XLA"
    fallback = None
    try:
        t = time_calls("ours", full, unet_only, args.repeats, first_call)
    except Exception as e:
        if not (fused and args.attention == "auto"):
            raise
        fallback = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"[ours] failed with cuDNN attention ({fallback}); again with XLA's", flush=True)
        runner, attention = stage_runner(unet_graph("xla")), "XLA (cuDNN failed)"
        t = time_calls("ours", full, unet_only, args.repeats, first_call)
    memory = {}
    if getattr(args, "memory_report", False):
        arrays = {k: jnp.asarray(v) for k, v in p.arrays().items()}
        programs = {
            "denoise": runner._denoise.lower(
                runner.unet_state, x, arrays, cond, jnp.float32(args.guidance), sample_key,
                sampler=p.sampler, use_cfg=args.guidance > 1,
            ),
            "decode": vae._decode.lower(vae.state, unet_only()),
        }  # fmt: skip
        for name, lowered in programs.items():
            m = lowered.compile().memory_analysis()
            memory[name] = {
                k: getattr(m, k, None)
                for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
            }
            print(f"[ours] {name} program memory (GB): "
                  + ", ".join(f"{k[:-14]} {v / 1e9:.2f}" for k, v in memory[name].items() if v),
                  flush=True)  # fmt: skip
    stats = dev.memory_stats() or {}
    result = dict(
        compiled_memory=memory,
        impl="ours",
        env=env,
        dtype=dtype_name,
        vae_dtype="fp32",
        attention=f"{attention} (jax.nn.dot_product_attention, --attention {args.attention})",
        attention_fallback=fallback,
        first_call_parts_s=first_parts,
        setup_s=setup_s,
        params={"unet": int(n_unet), "vae": int(n_vae)},
        peak_device_bytes=stats.get("peak_bytes_in_use"),
        **t,
    )
    try:
        result.update(model_flops(cfg, args.batch, args.height, args.width))
    except Exception as e:  # an estimate only: never lose the timings over it
        print(f"[ours] FLOP count failed: {type(e).__name__}: {e}", flush=True)
    return result


# -- diffusers (PyTorch) -----------------------------------------------------------------------
def run_diffusers(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # sdxl_jax's configs import jax: keep it off
    import warnings

    import diffusers
    import torch

    from sdxl_jax.diffusion.schedule import SDXL_SCHEDULER_CONFIG
    from sdxl_jax.weights import configs

    cfg = preset_configs(args.preset)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype_name = pick_dtype(args.dtype, on_gpu)
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    # SDXL's VAE ships in fp16 with force_upcast=True: the pipeline decodes in fp32.
    vae_tdtype = torch.float32 if dtype_name == "fp32" else torch.float16
    env = {
        "device": torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "tf32": {
            "cudnn (convs)": torch.backends.cudnn.allow_tf32,
            "cuda matmul": torch.backends.cuda.matmul.allow_tf32,
        },
    }
    print(f"[diffusers] {env}", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    vae_ref = configs.vae_to_reference(cfg["vae"])
    assert vae_ref["force_upcast"] is True
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel.from_config(configs.unet_to_reference(cfg["unet"]))
        vae = diffusers.AutoencoderKL.from_config(vae_ref)
    unet = unet.to(tdtype).eval()
    vae = vae.to(vae_tdtype).eval()
    scheduler_cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[args.sampler])
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler_cls.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if on_gpu:
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    print(
        f"[diffusers] random UNet ({n_unet:,} params, {dtype_name}) and VAE ({n_vae:,} params, "
        f"{str(vae_tdtype).removeprefix('torch.')}, force_upcast) built on {env['device']} in "
        f"{setup_s:.1f} s; attention processors {processors}",
        flush=True,
    )

    inp = make_inputs(args, cfg)

    def put(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, tdtype)

    kw = dict(
        prompt_embeds=put(inp["context"]),
        negative_prompt_embeds=put(inp["neg_context"]),
        pooled_prompt_embeds=put(inp["pooled"]),
        negative_pooled_prompt_embeds=put(inp["neg_pooled"]),
        latents=put(inp["noise"].transpose(0, 3, 1, 2)),  # NCHW; the pipeline scales it
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        return_dict=False,
    )

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def call(output_type):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # upcast_vae's deprecation notice, every call
            out = pipe(output_type=output_type, **kw)[0]
        sync()
        return out

    def full():
        images = call("np")  # float32 numpy [B, H, W, 3] in [0, 1]: on the host
        assert images.shape == (args.batch, args.height, args.width, 3), images.shape

    def unet_only():
        return call("latent").float().cpu()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t = time_calls("diffusers", full, unet_only, args.repeats)
    sdpa = {}
    if on_gpu:
        sdpa = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    return dict(
        impl="diffusers",
        env=env,
        dtype=dtype_name,
        vae_dtype=f"{str(vae_tdtype).removeprefix('torch.')} (force_upcast: decodes in fp32)",
        attention=f"PyTorch SDPA ({', '.join(processors)}; backends enabled {sdpa or 'cpu'})",
        setup_s=setup_s,
        params={"unet": int(n_unet), "vae": int(n_vae)},
        peak_device_bytes=torch.cuda.max_memory_allocated() if on_gpu else None,
        **t,
    )


# -- driver ------------------------------------------------------------------------------------
def run_children(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Each implementation in a subprocess of this script; a later one inherits the time an
    earlier one left unused (--timeout is per implementation)."""
    results = []
    budget = args.timeout * len(IMPLS) if args.timeout else None
    start = time.perf_counter()
    for i, impl in enumerate(IMPLS):
        limit = None
        if budget:
            limit = budget - (time.perf_counter() - start) - args.timeout * (len(IMPLS) - 1 - i)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, *argv, "--impl", impl, "--result-file", str(out)]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if impl == "ours":
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            else:
                env["JAX_PLATFORMS"] = "cpu"  # jax is imported for configs only: not on the GPU
            print(f"\n=== {impl} (subprocess, timeout {limit and round(limit)} s) ===", flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, timeout=limit)
                error = f"exit {proc.returncode}" if proc.returncode else None
            except subprocess.TimeoutExpired:
                error = f"timed out after {time.perf_counter() - t0:.0f} s"
            if error is None and out.exists():
                results.append(json.loads(out.read_text()))
            else:
                results.append({"impl": impl, "error": error or "no result written"})
    return results


def child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--preset", args.preset, "--height", str(args.height), "--width", str(args.width)]
    argv += ["--steps", str(args.steps), "--guidance", str(args.guidance)]
    argv += ["--batch", str(args.batch), "--sampler", args.sampler]
    argv += ["--repeats", str(args.repeats), "--seed", str(args.seed)]
    argv += ["--attention", args.attention]
    return argv + (["--dtype", args.dtype] if args.dtype else [])


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    flops = next((r["unet_call_flops"] for r in results if "unet_call_flops" in r), None)
    head = (
        "impl", "device", "dtype", "first call s", f"median s/batch ({args.repeats})",
        "s/image", "UNet loop s", "rest s", "UNet TFLOP/s", "peak GB",
    )  # fmt: skip
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append((r["impl"], "-", "-", r["error"], *["-"] * (len(head) - 4)))
            continue
        tflops = "-"
        if flops:
            tflops = f"{flops * args.steps / r['unet_median_s'] / 1e12:.3g}"
        peak = r.get("peak_device_bytes")
        rows.append(
            (
                r["impl"],
                r["env"]["device"],
                r["dtype"],
                fmt_s(r["first_call_s"]),
                fmt_s(r["median_s"]),
                fmt_s(r["median_s"] / args.batch),
                fmt_s(r["unet_median_s"]),
                fmt_s(r["median_s"] - r["unet_median_s"]),
                tflops,
                "-" if peak is None else f"{peak / 1e9:.1f}",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=("tiny", "sdxl"), default="tiny", help="default tiny")
    p.add_argument("--height", type=int, help="pixels (default 1024 for sdxl, 64 for tiny)")
    p.add_argument("--width", type=int, help="pixels (default 1024 for sdxl, 64 for tiny)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="default euler")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the first (3)")
    p.add_argument(
        "--dtype", choices=DTYPES, help="UNet weights and compute (default: bf16 on GPU, fp32 CPU)"
    )
    p.add_argument("--impl", choices=("ours", "diffusers", "both"), default="both")
    p.add_argument(
        "--attention",
        choices=("auto", "xla", "cudnn"),
        default="auto",
        help="ours: UNetConfig.attention_impl (auto: cuDNN on GPU in bf16/fp16, else XLA; if "
        "cuDNN fails under auto, the run is redone with XLA and says so)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--memory-report",
        action="store_true",
        help="ours: also print XLA's memory analysis of the two compiled programs",
    )
    p.add_argument("--json", type=Path, help="write the settings and results here")
    p.add_argument(
        "--timeout",
        type=float,
        help="--impl both: seconds per implementation's subprocess (one that ends early leaves "
        "its rest to the next); default none",
    )
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)  # a child's output
    args = p.parse_args(argv)
    default = 1024 if args.preset == "sdxl" else 64
    args.height, args.width = args.height or default, args.width or default
    if args.steps < 1 or args.batch < 1 or args.repeats < 1:
        p.error("--steps, --batch and --repeats must be at least 1")
    if args.guidance <= 1:
        p.error("--guidance must be > 1: the benchmark times the guided (cond + uncond) loop")
    if args.height % 8 or args.width % 8:
        p.error("--height and --width must be multiples of 8")

    print(
        f"sample_speed: preset {args.preset}, {args.height}x{args.width}, {args.steps} steps "
        f"{args.sampler}, guidance {args.guidance}, batch {args.batch}, repeats {args.repeats}, "
        f"dtype {args.dtype or 'auto'}; {platform.node()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    if args.impl == "both":
        results = run_children(args, child_argv(args))
    else:
        results = [run_ours(args) if args.impl == "ours" else run_diffusers(args)]
        if args.impl == "diffusers" and args.result_file is None:
            cfg = preset_configs(args.preset)
            results[0].update(model_flops(cfg, args.batch, args.height, args.width))
        if args.result_file:
            args.result_file.write_text(json.dumps(results[0]))
            return 0

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.pop("result_file")
    flops = next((r for r in results if "unet_call_flops" in r), None)
    print("\n" + "=" * 100)
    print(
        "Random weights, the same precomputed random text embeddings and initial noise (text "
        "encoding excluded). Timed: the denoising loop (cond + uncond batch per UNet call, "
        "guidance, sampler step) + VAE decode in fp32, to pixels on the host. ours: one jitted "
        "lax.fori_loop over the steps (sdxl_jax StageRunner) + the jitted VAERunner.decode. "
        "diffusers: StableDiffusionXLPipeline, eager PyTorch (no torch.compile), SDPA attention; "
        "with a half-precision UNet its VAE is fp16 and force_upcast casts it to fp32 for each "
        "decode, as for SDXL. First call: ours includes XLA compilation of both programs. "
        "rest s = median(denoise + decode) - median(denoise only): the decode and the copy to "
        "the host (diffusers: also the VAE's casts). UNet TFLOP/s: the counted FLOPs below / "
        "UNet loop s."
    )
    for r in results:
        if "error" in r:
            print(f"{r['impl']}: FAILED ({r['error']})")
            continue
        print(
            f"{r['impl']}: {r['env']}; UNet {r['dtype']}, VAE {r['vae_dtype']}; attention "
            f"{r['attention']}; setup {r['setup_s']:.1f} s; runs {fmt_list(r['runs_s'])} s, "
            f"UNet loop {fmt_list(r['unet_runs_s'])} s; final latents finite: "
            f"{r['latents_finite']} (std {r['latents_std']:.3g})"
        )
        if r.get("first_call_parts_s"):
            parts = r["first_call_parts_s"]
            print(
                f"{r['impl']}: first call = denoise {parts['denoise_s']:.3f} s + decode "
                f"{parts['decode_s']:.3f} s, each with its compilation"
            )
    if flops:
        n, unet = 2 * args.batch, flops["unet_call_flops"]
        print(
            f"FLOPs (matmuls + convs, 2 per multiply-add, padding included): UNet call on the "
            f"guidance batch of {n}: {fmt_flop(unet)}; x {args.steps} steps = "
            f"{fmt_flop(unet * args.steps)} per batch; VAE decode "
            f"{fmt_flop(flops['vae_decode_flops'])}"
        )
    print(
        f"\npreset {args.preset}, {args.height}x{args.width}, {args.steps} steps {args.sampler}, "
        f"guidance {args.guidance}, batch {args.batch}; median of {args.repeats} after 1 first call"
    )
    print(table(results, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0 if all("error" not in r for r in results) else 1


def fmt_flop(x: float) -> str:
    return f"{x / 1e12:.3f} TFLOP" if x >= 1e11 else f"{x / 1e9:.3f} GFLOP"


def fmt_list(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"


if __name__ == "__main__":
    sys.exit(main())
