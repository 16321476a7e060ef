"""The full-size train step lowered without allocating anything: XLA's FLOP count per sample,
the compiler's activation-memory plan, and each device's parameter bytes under the sharding
rules. ``python -m sdxl_jax.plan`` and ``benchmarks/train_step_lowering.py`` build on these."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax import sharding as sh
from sdxl_jax.models.lora import LoRAConfig, attach
from sdxl_jax.train.state import init_state, make_optimizer
from sdxl_jax.train.step import StepConfig, split_models, train_step
from sdxl_jax.weights.components import COMPONENTS

TEXT_TOKENS = 77
LOWER_BATCH = 8  # samples in the lowered step that FLOPs are counted on
COMPILE_DEVICES = 8  # simulated devices (fsdp) for --compile


@dataclasses.dataclass(frozen=True)
class Activations:
    """Per-device memory the step needs besides the state and the gradients, from a compiled
    plan: ``per_sample`` bytes per sample at ``latent_pixels`` (scaled linearly with the latent
    pixel count), ``other`` bytes independent of the batch (weight copies gathered for compute,
    workspace; the CPU compiler's temporaries at zero batch minus the gradients' shard)."""

    per_sample: float
    other: float
    latent_pixels: int
    source: str


def abstract_batch(unet: Any, latent_hw: tuple[int, int], batch: int, *, refiner: bool) -> dict:
    """Shapes of a batch from the latent and text-embedding cache (what the full-size stages
    train on): posterior mean / log-variance, context, pooled text and the size conditioning."""
    h, w = latent_hw
    n_ids = 5 if refiner else 6  # refiner: sizes, crop, aesthetic score; base: + target size
    pooled = unet.projection_class_embeddings_input_dim - n_ids * unet.addition_time_embed_dim
    S = jax.ShapeDtypeStruct
    out = {
        "latent_mean": S((batch, h, w, unet.in_channels), jnp.float16),
        "latent_logvar": S((batch, h, w, unet.in_channels), jnp.float16),
        "context": S((batch, TEXT_TOKENS, unet.cross_attention_dim), jnp.float16),
        "pooled": S((batch, pooled), jnp.float16),
        "original_size": S((batch, 2), jnp.int32),
        "crop_coords_top_left": S((batch, 2), jnp.int32),
    }
    if not refiner:
        out["target_size"] = S((batch, 2), jnp.int32)
    return out


def lower_train_step(
    unet: Any,
    latent_hw: tuple[int, int],
    batch: int,
    mesh: Any,
    *,
    remat: bool,
    unroll: bool = False,
    refiner: bool = False,
    compute_dtype: str = "bfloat16",
    optimizer: Any = None,
    lora: LoRAConfig | None = None,
) -> tuple[Any, Any]:
    """(``jax.stages.Lowered``, abstract TrainState) of the jitted, state-donating train step
    for ``unet`` (a UNetConfig) at ``latent_hw`` latents and global ``batch`` on ``mesh`` (state
    sharded by the logical-axis rules, batch over data x fsdp). Nothing is allocated.

    ``unroll``: unroll the scanned transformer stacks (for FLOP counting: XLA counts a scan body
    once). ``optimizer`` defaults to the paper's AdamW (constant lr after warm-up). ``lora``:
    only these adapters train, over a frozen base in the compute dtype (an argument of the
    step, sharded by the same rules).
    """

    cfg = dataclasses.replace(unet, remat=remat, scan_unroll=unroll)
    model = COMPONENTS["unet"].abstract(
        cfg, dtype=jnp.dtype(compute_dtype), param_dtype=jnp.float32
    )
    if lora is not None:
        attach(model, lora, nnx.Rngs(0))
    graphs, params, frozen = split_models(model)
    frozen = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, jnp.dtype(compute_dtype))
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        frozen,
    )
    if optimizer is None:
        optimizer = make_optimizer(1e-4, 10_000, 600_000, schedule="constant")
    state = jax.eval_shape(lambda p: init_state(p, optimizer, 0), params)
    state_sh = sh.tree_shardings(state, mesh)
    inputs = abstract_batch(cfg, latent_hw, batch, refiner=refiner)
    batch_sh = {k: NamedSharding(mesh, P(sh.BATCH_AXES)) for k in inputs}
    step_cfg = (StepConfig.for_refiner if refiner else StepConfig)(compute_dtype=compute_dtype)
    step = functools.partial(train_step, graphs=graphs, cfg=step_cfg, optimizer=optimizer)
    fn = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh, sh.tree_shardings(frozen, mesh)),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh):  # as the trainer runs it (activations kept batch-split)
        return fn.lower(state, inputs, frozen), state


def xla_flops(lowered: Any) -> float:
    """XLA's FLOP count of a lowered program (before partitioning: the whole program)."""
    cost = lowered.cost_analysis() or {}
    return float(cost.get("flops", 0.0))


def flops_per_sample(
    unet: Any,
    latent_hw: tuple[int, int],
    *,
    refiner: bool = False,
    compute_dtype: str = "bfloat16",
    optimizer: Any = None,
    remat: bool = False,
    batch: int = LOWER_BATCH,
    lora: LoRAConfig | None = None,
) -> float:
    """XLA's FLOPs of one training step / batch, scanned stacks unrolled, on one CPU device.
    ``remat=False`` (default) counts model FLOPs; True adds the recomputation (hardware FLOPs)."""

    mesh = sh.make_mesh({"fsdp": 1}, jax.devices()[:1])
    lowered, _ = lower_train_step(
        unet, latent_hw, batch, mesh, remat=remat, unroll=True, refiner=refiner,
        compute_dtype=compute_dtype, optimizer=optimizer, lora=lora,
    )  # fmt: skip
    return xla_flops(lowered) / batch


def param_bytes_per_device(params: Any, mesh_sizes: Mapping[str, int]) -> int:
    """Bytes of one device's shard of ``params`` (abstract or concrete nnx.State) on a mesh of
    these axis sizes, by the logical-axis rules (a dimension an axis does not divide stays whole).
    No devices needed."""

    sizes = {a: int(mesh_sizes.get(a, 1)) for a in sh.MESH_AXES}
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    leaves = jax.tree.leaves(params)
    shardings = jax.tree.leaves(sh.tree_shardings(params, mesh))
    return sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, shardings, strict=True)
    )


def measure_activations(
    unet: Any,
    latent_hw: tuple[int, int],
    *,
    axis: str = "fsdp",
    refiner: bool = False,
    compute_dtype: str = "bfloat16",
    optimizer: Any = None,
    devices: int = COMPILE_DEVICES,
    lora: LoRAConfig | None = None,
) -> Activations:
    """Compile the scanned step (remat as ``unet.remat``) on ``devices`` simulated devices, all
    on mesh ``axis`` ("fsdp", or "data": replicated weights), at 1 and 2 samples per device. The
    CPU compiler's temporaries give one sample's bytes (the difference) and the rest, less the
    gradients' shard (``memory`` adds it back for the mesh at hand). Needs ``devices`` CPU
    devices (XLA_FLAGS, set before jax starts its backend)."""
    if jax.device_count() < devices:
        raise RuntimeError(
            f"--compile needs {devices} CPU devices, jax has {jax.device_count()}: start python "
            f"with XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        )
    mesh = sh.make_mesh({axis: devices}, jax.devices()[:devices])
    temps, state = [], None
    for per_device in (1, 2):
        lowered, state = lower_train_step(
            unet, latent_hw, per_device * devices, mesh, remat=unet.remat, refiner=refiner,
            compute_dtype=compute_dtype, optimizer=optimizer, lora=lora,
        )  # fmt: skip
        temps.append(lowered.compile().memory_analysis().temp_size_in_bytes)
    per_sample = temps[1] - temps[0]
    grads = param_bytes_per_device(state.params, {axis: devices})
    h, w = latent_hw
    return Activations(
        float(per_sample),
        float(temps[0] - per_sample - grads),
        h * w,
        f"measured now: CPU plan at {h}x{w} latents, {axis}={devices}",
    )
