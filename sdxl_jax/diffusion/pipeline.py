"""SDXL text-to-image and image-to-image: checkpoints in, latents and images out.

A :class:`Stage` is one denoising model with its text encoders (the base, or the refiner);
:func:`check_stage` reads only configs, so bad checkpoints fail before any weight is read or
anything compiles. Each stage compiles two programs: text encoding, and the whole denoising
loop (guidance inside, ``lax.fori_loop`` over the plan). Prompts are sharded over all devices
along the batch; weights are replicated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax import conditioning
from sdxl_jax.diffusion import samplers
from sdxl_jax.diffusion.denoiser import conditional, denoiser, guided
from sdxl_jax.diffusion.schedule import NoiseSchedule, SamplerSteps
from sdxl_jax.models import vae as vae_lib
from sdxl_jax.weights import diffusers_io, formats, single_file
from sdxl_jax.weights.safetensors_io import TensorSource

# diffusers' SDXL defaults: refiner aesthetic scores for the conditional and negative branch.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """What a checkpoint holds, from its configs alone."""

    path: Path
    fmt: str  # "diffusers" | "single-file"
    role: str  # "base" | "refiner"
    components: tuple[str, ...]
    configs: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    schedule: NoiseSchedule


def role_of(configs: dict[str, Any]) -> str:
    """base (6 micro-conditioning numbers) or refiner (5), from the UNet's vector width."""
    unet, g = configs["unet"], configs.get("text_encoder_2")
    if g is None or g.projection_dim is None:
        raise ValueError("text_encoder_2 must be a CLIPTextModelWithProjection (pooled output)")
    n = (unet.projection_class_embeddings_input_dim - g.projection_dim) / max(
        unet.addition_time_embed_dim, 1
    )
    if n == 6:
        return "base"
    if n == 5:
        return "refiner"
    raise ValueError(
        f"UNet vector conditioning is {unet.projection_class_embeddings_input_dim} wide: "
        f"neither SDXL base (pooled + 6 x {unet.addition_time_embed_dim}) nor refiner (+ 5 x)"
    )


def check_stage(path: str | Path, *, need_vae: bool = True) -> StageInfo:
    """Read a checkpoint's configs and check it has every part sampling needs."""
    path = Path(path)
    fmt = formats.detect(path)
    if fmt == "single-file":
        source = TensorSource.open(path)
        layout = single_file.detect_layout(source.keys(), source)
        components = tuple(layout.prefixes)
        configs = {c: layout.config(c) for c in components}
        role = layout.kind
        force_zeros = role == "base"
        schedule = NoiseSchedule()
    else:
        components = tuple(
            c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (path / c).is_dir()
        )
        configs = {c: diffusers_io.read_config(path, c) for c in components}
        index = path / "model_index.json"
        meta = json.loads(index.read_text()) if index.exists() else {}
        role = None
        schedule = NoiseSchedule.from_checkpoint(path)
    for part in ("unet", "text_encoder_2"):
        if part not in components:
            raise ValueError(f"{path} has no {part}: sampling needs a UNet and both text encoders")
    role = role or role_of(configs)
    if fmt != "single-file":
        force_zeros = bool(meta.get("force_zeros_for_empty_prompt", role == "base"))
    if role == "base" and "text_encoder" not in components:
        raise ValueError(f"{path} is an SDXL base without text_encoder/ (CLIP-L)")
    if need_vae and "vae" not in components:
        raise ValueError(f"{path} has no VAE: pass a checkpoint with vae/ (or --vae PATH)")
    return StageInfo(path, fmt, role, components, configs, force_zeros, schedule)


def check_vae(path: str | Path) -> Any:
    """The VAE config of a checkpoint (a diffusers folder with vae/, or a single file)."""
    path = Path(path)
    if formats.detect(path) == "single-file":
        source = TensorSource.open(path)
        layout = single_file.detect_layout(source.keys(), source)
        if "vae" not in layout.prefixes:
            raise ValueError(f"{path} holds no VAE (no first_stage_model.* keys)")
        return layout.config("vae")
    if not (path / "vae").is_dir():
        raise ValueError(f"{path} has no vae/ folder")
    return diffusers_io.read_config(path, "vae")


@dataclasses.dataclass
class Stage:
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
) -> Stage:
    """Load the UNet and text encoders of a checked checkpoint (weights in ``dtype``)."""
    tok_root = Path(tokenizers) if tokenizers else info.path
    if info.fmt == "single-file" and tokenizers is None:
        raise ValueError(
            f"{info.path} is a single file and carries no tokenizers: pass --tokenizers DIR, a "
            f"diffusers SDXL folder with tokenizer/ and tokenizer_2/"
        )
    want = ["unet", "text_encoder_2"] + (["text_encoder"] if info.role == "base" else [])
    models = formats.load(info.path, want, dtype=dtype, param_dtype=dtype, progress=progress)
    clip_l = models.get("text_encoder")
    text = conditioning.TextEncoders(
        clip_l=clip_l,
        clip_g=models["text_encoder_2"],
        tokenizer_l=conditioning.load_tokenizer(tok_root / "tokenizer") if clip_l else None,
        tokenizer_g=conditioning.load_tokenizer(tok_root / "tokenizer_2"),
    )
    unet_graph, unet_state = nnx.split(models["unet"])
    text_graph, text_state = nnx.split((clip_l, models["text_encoder_2"]))
    return Stage(info, unet_graph, unet_state, text_graph, text_state, text)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P("batch")))


def make_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh over all devices: prompts are split over it."""
    return Mesh(np.array(devices or jax.devices()), ("batch",))


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

    def __init__(self, stage: Stage, mesh: Mesh):
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
            def model(x, t, c):
                # Merged inside the loop body: NNX modules must not cross trace levels.
                unet = nnx.merge(unet_graph, unet_state)
                ctx, pooled, ids = c
                tt = jnp.broadcast_to(t, (x.shape[0],))
                return unet(x.astype(unet.dtype), tt, ctx, pooled, ids)

            pos = (cond.context, cond.pooled, cond.time_ids)
            neg = (cond.neg_context, cond.neg_pooled, cond.neg_time_ids)
            m = guided(model, pos, neg, scale) if use_cfg else conditional(model, pos)
            return samplers.sample(sampler, denoiser(m, prediction), x, arrays, key)

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
    ) -> Conditioning:
        """Text and micro-conditioning for a batch (diffusers' SDXL rules for negatives)."""
        n = len(prompts)
        ctx, pooled = self.encode(prompts)
        if self.stage.role == "base":
            ids = conditioning.base_time_ids((height, width), (0, 0), (height, width))
            pos_ids = neg_ids = np.broadcast_to(ids, (n, 6))
        else:
            size = np.broadcast_to(np.float32([height, width]), (n, 2))
            pos_ids = conditioning.refiner_time_ids(size, (0, 0), AESTHETIC_SCORE)
            neg_ids = conditioning.refiner_time_ids(size, (0, 0), NEGATIVE_AESTHETIC_SCORE)
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
        plan: SamplerSteps,
        cond: Conditioning,
        guidance: float,
        key: jax.Array,
    ) -> jax.Array:
        """Run ``plan`` from state ``x`` [B, h, w, 4] (the sampler's own convention)."""
        use_cfg = guidance > 1.0
        arrays = {k: jnp.asarray(v) for k, v in plan.arrays().items()}
        return self._denoise(
            self.unet_state,
            shard_batch(x, self.mesh),
            arrays,
            cond,
            jnp.float32(guidance),
            key,
            sampler=plan.sampler,
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
            model = nnx.merge(graph, state)
            z = vae_lib.from_diffusion_latents(latents.astype(jnp.float32), config)
            img = model.decode(z)
            return jnp.round(jnp.clip(img / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)

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
    base = jax.random.key(seed)
    return np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(base, k), shape)) for k in indices]
    )


def image_keys(seed: int, stream: int, indices: Sequence[int]) -> jax.Array:
    """[len(indices)] PRNG keys, image k's from (seed, stream, k): independent of batching."""
    base = jax.random.fold_in(jax.random.key(seed), 0x5D1 + stream)
    return jnp.stack([jax.random.fold_in(base, k) for k in indices])


def padded(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
