"""The sampling runtime: loaded stages compiled on a mesh, and the fp32 VAE.

A :class:`StageModels` is one denoising model with its text encoders (the base, or the
refiner), loaded from a checkpoint checked by :mod:`sdxl_jax.inference.checkpoints`. A
:class:`StageRunner` compiles two programs per stage: text encoding, and the whole denoising
loop (guidance inside, ``lax.fori_loop`` over the sampler's steps). Prompts are sharded over
the mesh's batch axes; weights are replicated. :func:`denoise_latents` and
:func:`decode_uint8` are the pure functions inside, which training previews also call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax import conditioning, sharding
from sdxl_jax.diffusion import samplers
from sdxl_jax.diffusion.denoiser import conditional, denoiser, guided
from sdxl_jax.diffusion.schedule import SamplerSteps
from sdxl_jax.inference.checkpoints import StageInfo
from sdxl_jax.models import vae as vae_lib
from sdxl_jax.weights import formats


def denoise_latents(
    unet: Callable[[], Any],
    x: jax.Array,
    arrays: dict[str, jax.Array],
    pos: tuple[jax.Array, jax.Array, jax.Array],
    neg: tuple[jax.Array, jax.Array, jax.Array] | None,
    scale: jax.Array,
    key: jax.Array | None,
    *,
    sampler: str,
    prediction: str,
) -> jax.Array:
    """Run a sampler over the steps ``arrays`` (``SamplerSteps.arrays()``) from state ``x``.

    ``unet()`` builds the UNet module; it is called inside the loop body (NNX modules must not
    cross trace levels). ``pos`` / ``neg``: (context, pooled, time_ids) of the conditional and
    unconditional branch; ``neg=None`` runs without classifier-free guidance.
    """

    def model(x, t, c):
        net = unet()
        ctx, pooled, ids = c
        tt = jnp.broadcast_to(t, (x.shape[0],))
        return net(x.astype(net.dtype), tt, ctx, pooled, ids)

    m = conditional(model, pos) if neg is None else guided(model, pos, neg, scale)
    return samplers.sample(sampler, denoiser(m, prediction), x, arrays, key)


def decode_uint8(vae: vae_lib.AutoencoderKL, latents: jax.Array) -> jax.Array:
    """Diffusion-scale latents [B, h, w, 4] -> uint8 images [B, H, W, 3] (fp32 decode)."""
    z = vae_lib.from_diffusion_latents(latents.astype(jnp.float32), vae.config)
    return to_uint8(vae.decode(z))


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8, rounded as diffusers' ``VaeImageProcessor`` does."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


@dataclasses.dataclass
class StageModels:
    """One denoising model and its conditioning, split for jit (graph static, state traced)."""

    info: StageInfo
    unet_graph: Any
    unet_state: Any
    text_graph: Any
    text_state: Any
    text: conditioning.TextEncoders

    @property
    def role(self) -> str:
        return self.info.role


def load_stage(
    info: StageInfo,
    *,
    dtype: Any = jnp.float32,
    tokenizers: str | Path | None = None,
    progress: bool = False,
    loras: Sequence[Any] = (),
) -> StageModels:
    """Load the UNet and text encoders of a checked checkpoint (weights in ``dtype``), with
    ``loras`` (checked :class:`~sdxl_jax.inference.loras.StageLoRA`) merged in."""
    tok_root = Path(tokenizers) if tokenizers else info.path
    if info.fmt == "single-file" and tokenizers is None:
        raise ValueError(
            f"{info.path} is a single file and carries no tokenizers: pass --tokenizers DIR, a "
            f"diffusers SDXL folder with tokenizer/ and tokenizer_2/"
        )
    want = ["unet", "text_encoder_2"] + (["text_encoder"] if info.role == "base" else [])
    models = formats.load(info.path, want, dtype=dtype, param_dtype=dtype, progress=progress)
    if loras:
        from sdxl_jax.inference import loras as loras_lib

        loras_lib.merge_into(models, loras)
    clip_l = models.get("text_encoder")
    text = conditioning.TextEncoders(
        clip_l=clip_l,
        clip_g=models["text_encoder_2"],
        tokenizer_l=conditioning.load_tokenizer(tok_root / "tokenizer") if clip_l else None,
        tokenizer_g=conditioning.load_tokenizer(tok_root / "tokenizer_2"),
    )
    unet_graph, unet_state = nnx.split(models["unet"])
    text_graph, text_state = nnx.split((clip_l, models["text_encoder_2"]))
    return StageModels(info, unet_graph, unet_state, text_graph, text_state, text)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Arrays with a leading batch axis, split over the mesh's batch axes."""
    return jax.device_put(tree, NamedSharding(mesh, P(sharding.BATCH_AXES)))


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A data-parallel mesh over ``devices`` (default: all): prompts are split over it."""
    return sharding.make_mesh({"data": -1}, devices=devices)


def batch_devices(mesh: Mesh) -> int:
    """How many ways a batch is split on ``mesh`` (its batch axes)."""
    return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


@dataclasses.dataclass
class Conditioning:
    """Both guidance branches of one batch (arrays with a leading batch axis)."""

    context: jax.Array  # [B, 77, D]
    pooled: jax.Array  # [B, P]
    time_ids: jax.Array  # [B, 6] base, [B, 5] refiner
    neg_context: jax.Array
    neg_pooled: jax.Array
    neg_time_ids: jax.Array


class StageRunner:
    """Compiled text encoding and denoising for one stage on a mesh."""

    def __init__(self, stage: StageModels, mesh: Mesh):
        self.stage = stage
        self.mesh = mesh
        self.unet_state = replicate(stage.unet_state, mesh)
        self.text_state = replicate(stage.text_state, mesh)
        text_graph, unet_graph = stage.text_graph, stage.unet_graph
        prediction = stage.info.schedule.prediction_type

        def encode(text_state, ids):
            clip_l, clip_g = nnx.merge(text_graph, text_state)
            return conditioning.encode_text(clip_l, clip_g, ids)

        def denoise(unet_state, x, arrays, cond, scale, key, *, sampler, use_cfg):
            pos = (cond.context, cond.pooled, cond.time_ids)
            neg = (cond.neg_context, cond.neg_pooled, cond.neg_time_ids) if use_cfg else None
            unet = lambda: nnx.merge(unet_graph, unet_state)  # noqa: E731
            return denoise_latents(
                unet, x, arrays, pos, neg, scale, key, sampler=sampler, prediction=prediction
            )

        self._encode = jax.jit(encode)
        self._denoise = jax.jit(denoise, static_argnames=("sampler", "use_cfg"))

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        ids = shard_batch(self.stage.text.tokenize(prompts), self.mesh)
        return self._encode(self.text_state, ids)

    def conditioning(
        self,
        prompts: Sequence[str],
        negative: Sequence[str] | None,
        height: int,
        width: int,
        use_cfg: bool,
        *,
        original_size: tuple[int, int] | None = None,
        crop: tuple[int, int] = (0, 0),
    ) -> Conditioning:
        """Text and micro-conditioning for a batch (diffusers' SDXL rules for negatives).

        ``original_size`` (default: the target size) and ``crop`` (top, left): diffusers'
        ``original_size`` / ``crops_coords_top_left`` with its defaults for the negative branch
        (the base repeats them; the refiner's negative crop stays (0, 0))."""
        n = len(prompts)
        ctx, pooled = self.encode(prompts)
        orig = original_size or (height, width)
        if self.stage.role == "base":
            ids = conditioning.base_time_ids(orig, crop, (height, width))
            pos_ids = neg_ids = np.broadcast_to(ids, (n, 6))
        else:
            size = np.broadcast_to(np.float32(orig), (n, 2))
            pos_ids = conditioning.refiner_time_ids(size, crop, conditioning.AESTHETIC_SCORE)
            neg_ids = conditioning.refiner_time_ids(
                size, (0, 0), conditioning.NEGATIVE_AESTHETIC_SCORE
            )
        if not use_cfg:
            neg_ctx, neg_pooled = ctx, pooled  # unused by the compiled loop
        elif negative is None and self.stage.info.force_zeros_for_empty_prompt:
            neg_ctx, neg_pooled = jnp.zeros_like(ctx), jnp.zeros_like(pooled)
        else:
            neg_ctx, neg_pooled = self.encode(list(negative) if negative else [""] * n)
        return Conditioning(
            ctx,
            pooled,
            shard_batch(np.ascontiguousarray(pos_ids, np.float32), self.mesh),
            neg_ctx,
            neg_pooled,
            shard_batch(np.ascontiguousarray(neg_ids, np.float32), self.mesh),
        )

    def denoise(
        self,
        x: jax.Array,
        steps: SamplerSteps,
        cond: Conditioning,
        guidance: float,
        key: jax.Array,
    ) -> jax.Array:
        """Run ``steps`` from state ``x`` [B, h, w, 4] (the sampler's own convention)."""
        use_cfg = guidance > 1.0
        arrays = {k: jnp.asarray(v) for k, v in steps.arrays().items()}
        return self._denoise(
            self.unet_state,
            shard_batch(x, self.mesh),
            arrays,
            cond,
            jnp.float32(guidance),
            key,
            sampler=steps.sampler,
            use_cfg=use_cfg,
        )


jax.tree_util.register_dataclass(
    Conditioning,
    data_fields=[f.name for f in dataclasses.fields(Conditioning)],
    meta_fields=[],
)


class VAERunner:
    """fp32 VAE encode and decode (SDXL's VAE overflows fp16), tiled for very large images."""

    def __init__(self, vae: vae_lib.AutoencoderKL, mesh: Mesh, tile: int = 192, overlap: int = 16):
        self.config = vae.config
        self.mesh = mesh
        self.tile, self.overlap = tile, overlap
        graph, state = nnx.split(vae)
        self.state = replicate(state, mesh)
        config = vae.config

        def decode(state, latents):
            return decode_uint8(nnx.merge(graph, state), latents)

        def decode_float(state, latents):
            model = nnx.merge(graph, state)
            return model.decode(vae_lib.from_diffusion_latents(latents, config))

        def encode(state, images, keys):
            model = nnx.merge(graph, state)
            mean, logvar = model.encode(images)
            z = jax.vmap(vae_lib.sample_posterior)(keys, mean, logvar)  # one key per image
            return vae_lib.to_diffusion_latents(z, config)

        self._decode = jax.jit(decode)
        self._decode_float = jax.jit(decode_float)
        self._encode = jax.jit(encode)

    def encode(self, images: np.ndarray, keys: jax.Array) -> jax.Array:
        """uint8 images [B, H, W, 3] -> diffusion-scale latents [B, H/8, W/8, 4], sampling the
        posterior with one key per image ([B] keys)."""
        x = images.astype(np.float32) / 127.5 - 1.0
        return self._encode(self.state, shard_batch(x, self.mesh), keys)

    def decode(self, latents: jax.Array) -> np.ndarray:
        """Diffusion-scale latents -> uint8 images [B, H, W, 3]."""
        h, w = latents.shape[1:3]
        if self.tile and max(h, w) > self.tile:
            return self._decode_tiled(latents)
        return np.asarray(self._decode(self.state, latents))

    def _decode_tiled(self, latents: jax.Array) -> np.ndarray:
        """Overlapping tiles, blended with linear ramps across the overlaps."""
        f = self.config.downscale
        t, o = self.tile, self.overlap
        b, h, w, _ = latents.shape
        out = np.zeros((b, h * f, w * f, 3), np.float32)
        weight = np.zeros((1, h * f, w * f, 1), np.float32)
        step = t - o
        for y in range(0, max(h - o, 1), step):
            for x in range(0, max(w - o, 1), step):
                y0, x0 = min(y, max(h - t, 0)), min(x, max(w - t, 0))
                tile = latents[:, y0 : y0 + t, x0 : x0 + t]
                img = np.asarray(self._decode_float(self.state, tile))
                th, tw = img.shape[1:3]
                ramp_y = _ramp(th, o * f, y0 > 0, y0 + t < h)
                ramp_x = _ramp(tw, o * f, x0 > 0, x0 + t < w)
                wgt = (ramp_y[:, None] * ramp_x[None, :])[None, :, :, None]
                out[:, y0 * f : y0 * f + th, x0 * f : x0 * f + tw] += img * wgt
                weight[:, y0 * f : y0 * f + th, x0 * f : x0 * f + tw] += wgt
        img = out / np.maximum(weight, 1e-8)
        return np.round(np.clip(img / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def _ramp(n: int, width: int, start: bool, end: bool) -> np.ndarray:
    r = np.ones(n, np.float32)
    ramp = (np.arange(width, dtype=np.float32) + 0.5) / width
    if start:
        r[:width] = np.minimum(r[:width], ramp)
    if end:
        r[n - width :] = np.minimum(r[n - width :], ramp[::-1])
    return r


def load_vae(path: str | Path, mesh: Mesh, *, progress: bool = False) -> VAERunner:
    models = formats.load(
        path, ["vae"], dtype=jnp.float32, param_dtype=jnp.float32, progress=progress
    )
    return VAERunner(models["vae"], mesh)


def initial_noise(seed: int, indices: Sequence[int], shape: tuple[int, int, int]) -> np.ndarray:
    """Unit Gaussian latents [len(indices), h, w, 4]; image k of a run always gets the same
    noise whatever the batch size (key = fold_in(seed, k))."""
    return np.asarray(_noise(image_keys_from(jax.random.key(seed), indices), shape))


def image_keys(seed: int, stream: int, indices: Sequence[int]) -> jax.Array:
    """[len(indices)] PRNG keys, image k's from (seed, stream, k): independent of batching."""
    return image_keys_from(jax.random.fold_in(jax.random.key(seed), 0x5D1 + stream), indices)


def image_keys_from(base: jax.Array, indices: Sequence[int]) -> jax.Array:
    """fold_in(base, k) for every k of ``indices``, in one call (not one dispatch per image)."""
    return _fold_in(base, jnp.asarray(list(indices), jnp.uint32))


@jax.jit
def _fold_in(base: jax.Array, ks: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, ks)


@functools.partial(jax.jit, static_argnums=1)
def _noise(keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(k, shape))(keys)


def padded(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
