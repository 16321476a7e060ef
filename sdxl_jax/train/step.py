"""The SDXL train step: one pure function from (state, batch, frozen encoders) to (state, metrics).

Per step (paper 2.5; SPEC "Noise schedule, loss, sampling"):

1. Latents ``x0``: the frozen VAE encodes the images and its posterior is sampled (online), or the
   posterior (mean, log-variance) comes cached from the data pipeline, already at the diffusion
   scale. Text: both frozen encoders run on token ids (online) or the embeddings come cached.
2. Guidance dropout zeroes context and pooled text per example with probability
   ``cond_dropout``; micro-conditioning from the batch's original size, crop and target size
   (refiner: aesthetic score instead of the target size).
3. ``t ~ U{t_min, ..., t_max - 1}``, noise ``N(0, 1)`` plus ``offset_noise * N(0, 1)`` constant
   over each example's image per channel; ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise``.
4. MSE to the epsilon (or v) target per example, optionally min-SNR-gamma weighted; gradients of
   the fp32 master weights through a forward in the compute dtype.
5. AdamW (see :mod:`sdxl_jax.train.state`); a non-finite loss or gradient norm leaves params,
   optimizer state and EMA untouched and is counted. The EMA follows every applied update.

Jit it once per batch shape with the static pieces closed over::

    step = jax.jit(
        functools.partial(train_step, graphs=graphs, cfg=cfg, optimizer=optimizer),
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    state, metrics = step(state, batch, frozen)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sdxl_jax import conditioning
from sdxl_jax.diffusion.schedule import NoiseSchedule
from sdxl_jax.models import lora as lora_lib
from sdxl_jax.models import vae as vae_lib
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.train.state import (
    TrainState,
    applies_update,
    ema_decay_at,
    ema_update,
    learning_rate,
    update_if_finite,
)

PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPUTE_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step does; hashable, closed over when jitting."""

    t_min: int = 0
    t_max: int = 1000  # exclusive; the refiner trains on the first 200 levels
    offset_noise: float = 0.0  # 0.05 in the multi-aspect stage
    prediction_type: str = "epsilon"
    min_snr_gamma: float | None = None  # Hang et al. 2023; 5.0 is their choice
    cond_dropout: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at step n
    compute_dtype: str = "bfloat16"  # the UNet graph must be built with this dtype
    refiner: bool = False  # 5 time ids: sizes, crop, aesthetic score
    # False: original size and crop coordinates enter as zeros (no size / crop conditioning,
    # the paper's Table 2 baseline); the target size (base) and aesthetic score stay.
    micro_conditioning: bool = True
    # The refiner's score when the batch has no "aesthetic_score" (diffusers' default).
    aesthetic_score: float = conditioning.AESTHETIC_SCORE
    schedule: NoiseSchedule = NoiseSchedule()

    def __post_init__(self) -> None:
        n = self.schedule.num_train_timesteps
        if not 0 <= self.t_min < self.t_max <= n:
            raise ValueError(
                f"StepConfig: need 0 <= t_min < t_max <= {n}, got t_min={self.t_min}, "
                f"t_max={self.t_max}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"StepConfig: prediction_type {self.prediction_type!r}: use one of "
                f"{PREDICTION_TYPES}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"StepConfig: compute_dtype {self.compute_dtype!r}: use one of {COMPUTE_DTYPES}"
            )
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"StepConfig: cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"StepConfig: ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(
                f"StepConfig: min_snr_gamma must be > 0 (or None), got {self.min_snr_gamma}"
            )
        if self.offset_noise < 0:
            raise ValueError(f"StepConfig: offset_noise must be >= 0, got {self.offset_noise}")

    @classmethod
    def for_refiner(cls, **kw: Any) -> StepConfig:
        """The refiner's step: the first 200 noise levels, 5 time ids with an aesthetic score."""
        return cls(**{"refiner": True, "t_max": 200, **kw})


@dataclasses.dataclass(frozen=True)
class Graphs:
    """The static halves of the models (``nnx.split``): the UNet's, and the frozen encoders'
    where they run inside the step. ``text`` is the graph of the pair ``(clip_l, clip_g)``,
    ``clip_l`` None for a refiner."""

    unet: Any  # nnx.GraphDef
    unet_config: UNetConfig
    vae: Any = None
    text: Any = None
    # LoRA: ``unet`` is the graph of (adapters, frozen base, other state); the trained
    # parameters are the adapters and ``frozen["unet"]`` / ``frozen["unet_rest"]`` the rest.
    lora: bool = False
    # Adapters on the text encoders too: the trained parameters are then
    # ``{"unet": ..., "text": ...}`` and the text is encoded inside the loss.
    text_lora: bool = False


class Inputs(NamedTuple):
    """What the UNet is trained on, before noising (all fp32). With text-encoder adapters the
    text is encoded in the loss: ``context`` / ``pooled`` are None and ``ids`` / ``drop`` (the
    token ids and the guidance-dropout mask) stand in."""

    x0: jax.Array  # [B, h, w, C] latents at the diffusion scale
    context: jax.Array | None  # [B, 77, D]
    pooled: jax.Array | None  # [B, P]
    time_ids: jax.Array  # [B, 6] base, [B, 5] refiner
    ids: dict[str, jax.Array] | None = None
    drop: jax.Array | None = None  # [B] bool
    weight: jax.Array | None = None  # [B] per-example loss weights (prior preservation)


def split_models(
    unet: nnx.Module,
    *,
    vae: nnx.Module | None = None,
    text_encoders: Sequence[nnx.Module | None] | None = None,
) -> tuple[Graphs, nnx.State, dict[str, nnx.State]]:
    """(graphs, UNet params, frozen states) from modules (concrete or ``nnx.eval_shape``).

    ``vae`` and ``text_encoders`` ``(clip_l or None, clip_g)`` are needed only for online
    training; ``frozen`` is then ``{"vae": ..., "text": ...}``.
    """
    frozen: dict[str, nnx.State] = {}
    if lora_lib.has_adapters(unet):
        # Only the adapters train; the base and the adapters' dropout keys ride along frozen.
        graph, params, frozen["unet"], frozen["unet_rest"] = nnx.split(
            unet, nnx.LoRAParam, nnx.Param, ...
        )
        graphs = Graphs(unet=graph, unet_config=unet.config, lora=True)
        encoders = tuple(text_encoders or ())
        if any(m is not None and lora_lib.has_adapters(m) for m in encoders):
            text_graph, text, frozen["text"], frozen["text_rest"] = nnx.split(
                encoders, nnx.LoRAParam, nnx.Param, ...
            )
            graphs = dataclasses.replace(graphs, text=text_graph, text_lora=True)
            params = {"unet": params, "text": text}
            text_encoders = None  # split here
    else:
        graph, params, rest = nnx.split(unet, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(
                "the UNet holds state other than nnx.Param; the train step cannot carry it"
            )
        graphs = Graphs(unet=graph, unet_config=unet.config)
    if vae is not None:
        vae_graph, frozen["vae"] = nnx.split(vae)
        graphs = dataclasses.replace(graphs, vae=vae_graph)
    if text_encoders is not None:
        text_graph, frozen["text"] = nnx.split(tuple(text_encoders))
        graphs = dataclasses.replace(graphs, text=text_graph)
    return graphs, params, frozen


# -- the diffusion objective ---------------------------------------------------------------


def sample_timesteps(key: jax.Array, n: int, cfg: StepConfig) -> jax.Array:
    """[n] int32, uniform in [t_min, t_max)."""
    return jax.random.randint(key, (n,), cfg.t_min, cfg.t_max, jnp.int32)


def sample_noise(key: jax.Array, shape: Sequence[int], offset: float = 0.0) -> jax.Array:
    """N(0, 1) of ``shape`` [B, h, w, C], plus ``offset * N(0, 1)`` of shape [B, 1, 1, C]
    (diffusers' ``noise_offset``: a per-example, per-channel constant shift)."""
    k_pixel, k_offset = jax.random.split(key)
    noise = jax.random.normal(k_pixel, shape, jnp.float32)
    if offset:
        b, c = shape[0], shape[-1]
        noise = noise + offset * jax.random.normal(k_offset, (b, 1, 1, c), jnp.float32)
    return noise


def alphas_cumprod(cfg: StepConfig) -> jax.Array:
    return jnp.asarray(cfg.schedule.alphas_cumprod, jnp.float32)  # [T]


def diffusion_target(
    x0: jax.Array, noise: jax.Array, abar: jax.Array, prediction_type: str
) -> jax.Array:
    """epsilon: the noise; v (Salimans & Ho 2022): ``sqrt(abar) noise - sqrt(1 - abar) x0``."""
    if prediction_type == "epsilon":
        return noise
    a = jnp.sqrt(abar).reshape(-1, 1, 1, 1)
    s = jnp.sqrt(1.0 - abar).reshape(-1, 1, 1, 1)
    return a * noise - s * x0


def snr_weight(abar: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023), [B]: ``min(SNR, gamma) / SNR`` for an
    epsilon target, ``min(SNR, gamma) / (SNR + 1)`` for v; ``SNR = abar / (1 - abar)``."""
    snr = abar / (1.0 - abar)
    clipped = jnp.minimum(snr, gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


def cast_floating(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, tree
    )


def unet_from(
    params: nnx.State,
    frozen: dict[str, nnx.State] | None,
    graphs: Graphs,
    dtype: Any,
    dropout_key: jax.Array | None = None,
) -> nnx.Module:
    """The UNet of the trained ``params`` (cast to ``dtype``): all its weights, or with LoRA
    its adapters over the frozen base in ``frozen`` (adapter dropout drawn from
    ``dropout_key``; None: no dropout, as in sampling)."""
    if not graphs.lora:
        return nnx.merge(graphs.unet, cast_floating(params, dtype))
    if graphs.text_lora:
        params = params["unet"]
    if not frozen or "unet" not in frozen:
        raise ValueError("a LoRA step needs the frozen base UNet: frozen['unet'] from split_models")
    unet = nnx.merge(
        graphs.unet,
        cast_floating(params, dtype),
        cast_floating(frozen["unet"], dtype),
        frozen["unet_rest"],
    )
    if dropout_key is not None:
        lora_lib.set_dropout_key(unet, dropout_key)
    return unet


def text_from(
    params: Any,
    frozen: dict[str, nnx.State],
    graphs: Graphs,
    dtype: Any,
    dropout_key: jax.Array | None = None,
) -> tuple[Any, Any]:
    """The text encoders (CLIP-L or None, bigG) with the trained adapters of ``params["text"]``
    over their frozen weights."""
    encoders = nnx.merge(
        graphs.text,
        cast_floating(params["text"], dtype),
        frozen["text"],
        frozen["text_rest"],
    )
    if dropout_key is not None:
        for i, m in enumerate(encoders):
            if m is not None:
                lora_lib.set_dropout_key(m, jax.random.fold_in(dropout_key, 100 + i))
    return encoders


def text_inputs(
    context: jax.Array, pooled: jax.Array, drop: jax.Array, graphs: Graphs, cfg: StepConfig
) -> tuple[jax.Array, jax.Array]:
    """The text conditioning the UNet reads: a refiner's bigG part, widths checked, guidance
    dropout applied."""
    width = graphs.unet_config.cross_attention_dim
    if cfg.refiner and context.shape[-1] > width:
        # A base context (CLIP-L then bigG): the refiner reads the bigG part only.
        context = context[..., -width:]
    if context.shape[-1] != width:
        raise ValueError(
            f"text context is {context.shape[-1]} wide but the UNet attends to {width}; "
            f"{'' if cfg.refiner else 'is this a refiner? set StepConfig.refiner; '}check the "
            f"text encoders or the cache"
        )
    return conditioning.drop_text(context, pooled, drop)


def loss_fn(
    params: nnx.State,
    inputs: Inputs,
    t: jax.Array,  # [B] int32
    noise: jax.Array,  # [B, h, w, C]
    *,
    graphs: Graphs,
    cfg: StepConfig,
    frozen: dict[str, nnx.State] | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The (weighted) mean squared error of the UNet's prediction, fp32; differentiable in
    ``params`` (fp32 master weights, cast to the compute dtype for the forward; with LoRA the
    adapters, over the frozen base in ``frozen``)."""
    abar = alphas_cumprod(cfg)[t]  # [B]
    a = jnp.sqrt(abar).reshape(-1, 1, 1, 1)
    s = jnp.sqrt(1.0 - abar).reshape(-1, 1, 1, 1)
    x_t = a * inputs.x0 + s * noise
    target = diffusion_target(inputs.x0, noise, abar, cfg.prediction_type)

    dtype = jnp.dtype(cfg.compute_dtype)
    unet = unet_from(params, frozen, graphs, dtype, dropout_key)
    if inputs.context is None:  # text-encoder adapters: encode with them
        clip_l, clip_g = text_from(params, frozen, graphs, dtype, dropout_key)
        context, pooled = conditioning.encode_text(clip_l, clip_g, inputs.ids)
        context, pooled = text_inputs(context, pooled, inputs.drop, graphs, cfg)
        inputs = inputs._replace(context=context, pooled=pooled)
    if jnp.dtype(unet.dtype) != dtype:
        # nnx layers promote their weights to the module dtype: a mismatch would silently
        # compute in the graph's dtype with weights rounded to ours.
        raise ValueError(
            f"the UNet graph computes in {jnp.dtype(unet.dtype).name} but StepConfig."
            f"compute_dtype is {dtype.name}: build the UNet with dtype=jnp.{dtype.name}"
        )
    pred = unet(x_t.astype(dtype), t, inputs.context, inputs.pooled, inputs.time_ids)
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))  # [B]
    if cfg.min_snr_gamma is not None:
        per_example = per_example * snr_weight(abar, cfg.min_snr_gamma, cfg.prediction_type)
    # kohya's loss weights: the batch mean of weight x loss (a class image counts w times).
    weighted = per_example if inputs.weight is None else per_example * inputs.weight
    return jnp.mean(weighted), {"per_example": per_example}


# -- inputs ------------------------------------------------------------------------------


def time_ids(batch: dict[str, jax.Array], cfg: StepConfig) -> jax.Array:
    """Micro-conditioning from the batch (:mod:`sdxl_jax.conditioning`): [B, 6] (original h, w,
    crop top, left, target h, w), refiner [B, 5] (original h, w, crop top, left, aesthetic
    score: the batch's ``aesthetic_score``, else ``cfg.aesthetic_score``); original size and
    crop zeroed when ``cfg.micro_conditioning`` is False."""
    orig, crop = batch["original_size"], batch["crop_coords_top_left"]
    if not cfg.micro_conditioning:
        orig, crop = jnp.zeros_like(orig), jnp.zeros_like(crop)
    if not cfg.refiner:
        return conditioning.base_time_ids(orig, crop, batch["target_size"])
    return conditioning.refiner_time_ids(
        orig, crop, batch.get("aesthetic_score", cfg.aesthetic_score)
    )


def prepare(
    batch: dict[str, jax.Array],
    frozen: dict[str, nnx.State] | None,
    key: jax.Array,
    *,
    graphs: Graphs,
    cfg: StepConfig,
) -> Inputs:
    """Latents, text embeddings (after guidance dropout) and time ids of a batch.

    Latents: ``latent_mean`` / ``latent_logvar`` (cache, diffusion scale) or ``image`` (online,
    the frozen VAE). Text: ``context`` / ``pooled`` (cache) or ``ids_l`` / ``ids_g`` (online,
    the frozen encoders). Both modes draw the posterior sample from the same key, so they agree.
    """
    k_latent, k_drop = jax.random.split(key)
    frozen = frozen or {}

    if "latent_mean" in batch:
        mean = batch["latent_mean"].astype(jnp.float32)
        logvar = batch["latent_logvar"].astype(jnp.float32)
        x0 = vae_lib.sample_posterior(k_latent, mean, logvar)
    elif "image" in batch:
        if graphs.vae is None or "vae" not in frozen:
            raise ValueError(
                "the batch holds images but the step has no VAE: pass split_models(..., vae=) "
                "graphs and frozen states, or train from a latent cache"
            )
        vae = nnx.merge(graphs.vae, frozen["vae"])
        mean, logvar = vae.encode(batch["image"])
        z = vae_lib.sample_posterior(k_latent, mean, logvar)
        x0 = vae_lib.to_diffusion_latents(z, vae.config).astype(jnp.float32)
    else:
        raise ValueError(f"the batch has neither latent_mean nor image (keys: {sorted(batch)})")

    drop = jax.random.bernoulli(k_drop, cfg.cond_dropout, (x0.shape[0],))
    weight = batch.get("loss_weight")
    weight = None if weight is None else weight.astype(jnp.float32)
    if graphs.text_lora:  # encoded in the loss, through the trained adapters
        if "ids_g" not in batch:
            raise ValueError(
                "text-encoder adapters need token ids (online text): the batch has "
                f"{sorted(batch)}; train without a text cache (data.cache='')"
            )
        ids = {k: batch[k] for k in ("ids_l", "ids_g") if k in batch}
        return Inputs(x0, None, None, time_ids(batch, cfg), ids=ids, drop=drop, weight=weight)
    if "context" in batch:
        context = batch["context"].astype(jnp.float32)
        pooled = batch["pooled"].astype(jnp.float32)
    elif "ids_g" in batch:
        if graphs.text is None or "text" not in frozen:
            raise ValueError(
                "the batch holds token ids but the step has no text encoders: pass "
                "split_models(..., text_encoders=) graphs and frozen states, or use a cache"
            )
        clip_l, clip_g = nnx.merge(graphs.text, frozen["text"])
        ids = {k: batch[k] for k in ("ids_l", "ids_g") if k in batch}
        context, pooled = conditioning.encode_text(clip_l, clip_g, ids)
    else:
        raise ValueError(f"the batch has neither context nor ids_g (keys: {sorted(batch)})")
    context, pooled = text_inputs(context, pooled, drop, graphs, cfg)
    return Inputs(x0, context, pooled, time_ids(batch, cfg), weight=weight)


# -- the step ------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    frozen: dict[str, nnx.State] | None = None,
    *,
    graphs: Graphs,
    cfg: StepConfig,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer call on one batch; pure. ``batch`` holds arrays only (no captions).

    Metrics (scalars): ``loss``, ``grad_norm`` (before clipping), ``lr`` (of the last applied
    update), ``skipped`` (1 if this step's update was dropped), ``t_mean``.
    """
    key = jax.random.fold_in(state.rng, state.step)
    k_inputs, k_t, k_noise = jax.random.split(key, 3)
    k_dropout = jax.random.fold_in(key, 3)  # LoRA dropout (adapters only)
    inputs = prepare(batch, frozen, k_inputs, graphs=graphs, cfg=cfg)
    t = sample_timesteps(k_t, inputs.x0.shape[0], cfg)
    noise = sample_noise(k_noise, inputs.x0.shape, cfg.offset_noise)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(
        state.params, inputs, t, noise, graphs=graphs, cfg=cfg, frozen=frozen,
        dropout_key=k_dropout,
    )  # fmt: skip
    grad_norm = optax.global_norm(grads)

    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply() -> dict[str, Any]:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Between accumulation steps the parameters do not move, and neither does the EMA.
        moved = applies_update(state.opt_state, opt_state)
        ema = jax.tree.map(
            lambda n, o: jnp.where(moved, n, o),
            ema_update(state.ema, params, ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup)),
            state.ema,
        )
        return {"params": params, "opt_state": opt_state, "ema": ema}

    new_state, bad = update_if_finite(state, ok, apply, ("params", "opt_state", "ema"))
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": learning_rate(new_state.opt_state),
        "skipped": bad,
        "t_mean": jnp.mean(t.astype(jnp.float32)),
    }
    return new_state, metrics
