"""``generate()``: prompts in, images out, with an SDXL base and optionally a refiner.

Three steps, each usable alone:

- :func:`check_models`: what the checkpoints hold, from their configs (nothing is loaded);
- :func:`make_request`: every setting of one call checked and resolved (sizes, sampler steps,
  the base/refiner hand-off, img2img) into a :class:`Request`, before anything compiles;
- :class:`Generator`: the models loaded once onto a mesh; each call runs a request in batches
  split over the devices, compiled once per batch shape and reused across calls.

:func:`generate` does all three. Image k of a request (prompt-major: prompt i's n-th image is
k = i * num_images + n) starts from noise ``fold_in(seed, k)``, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdxl_jax.data.buckets import SDXL_BUCKETS
from sdxl_jax.diffusion.schedule import SamplerSteps, sampler_steps

if TYPE_CHECKING:  # the checks import the weight readers (flax): only when a command runs
    from sdxl_jax.inference.checkpoints import StageInfo

DTYPES = ("auto", "fp32", "bf16", "fp16")


class UsageError(ValueError):
    """Bad settings: reported in one line before anything loads or compiles."""


@dataclasses.dataclass(frozen=True)
class Models:
    """The checkpoints of a generator, checked from their configs alone."""

    base: StageInfo
    refiner: StageInfo | None
    vae: Path  # the checkpoint (folder or single file) the VAE is loaded from
    vae_config: Any
    tokenizers: Path | None  # tokenizer/ + tokenizer_2/ for single files
    loras: tuple[Any, ...] = ()  # StageLoRA (sdxl_jax.inference.loras), checked

    def loras_for(self, stage: str) -> list[Any]:
        return [lo for lo in self.loras if lo.stage == stage]

    @property
    def factor(self) -> int:
        """Pixels per latent (the VAE's downscale)."""
        return self.vae_config.downscale


def check_models(
    checkpoint: str | Path,
    *,
    refiner: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizers: str | Path | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    lora_strict: bool = True,
) -> Models:
    """Check a base (or, for img2img, a refiner) checkpoint, an optional refiner and VAE, and
    LoRA files ``(path, scale)`` (each read for the stage it fits)."""
    from sdxl_jax.inference import checkpoints
    from sdxl_jax.inference import loras as loras_lib

    try:
        base = checkpoints.check_stage(checkpoint, need_vae=vae is None)
        ref = checkpoints.check_stage(refiner, need_vae=False) if refiner else None
        vae_config = checkpoints.check_vae(vae or checkpoint)
        if ref is not None and ref.role != "refiner":
            raise UsageError(f"--refiner {refiner} is an SDXL base, not a refiner")
        checked = loras_lib.check(loras, base, ref, strict=lora_strict) if loras else []
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    return Models(base, ref, Path(vae or checkpoint), vae_config, _path(tokenizers), tuple(checked))


def _path(p: str | Path | None) -> Path | None:
    return Path(p) if p else None


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation run, resolved and checked (see :func:`make_request`)."""

    prompts: tuple[str, ...]
    negative_prompt: str | None
    num_images: int  # per prompt
    seed: int
    height: int
    width: int
    guidance: float
    steps: int
    sampler: str
    karras: bool
    base_steps: SamplerSteps
    refiner_steps: SamplerSteps | None  # the refiner's window after the hand-off
    handoff: float | None
    init_image: np.ndarray | None  # uint8 [H, W, 3]
    strength: float | None
    noise: np.ndarray | None  # float32 [N, C, H/f, W/f] (diffusers' layout)
    original_size: tuple[int, int] | None  # size conditioning (default: height x width)
    crop: tuple[int, int]  # crop conditioning (top, left)

    @property
    def jobs(self) -> list[tuple[str, int]]:
        """(prompt, n-th image of that prompt) for every image, in output order."""
        return [(p, k) for p in self.prompts for k in range(self.num_images)]

    @property
    def use_cfg(self) -> bool:
        return self.guidance > 1.0


def make_request(
    models: Models,
    prompts: Sequence[str],
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
    steps: int = 50,
    guidance: float = 5.0,
    sampler: str | None = None,
    karras: bool = False,
    spacing: str | None = None,
    seed: int = 0,
    noise: np.ndarray | None = None,
    handoff: float = 0.8,
    init_image: np.ndarray | None = None,
    strength: float = 0.3,
    original_size: tuple[int, int] | None = None,
    crop: tuple[int, int] = (0, 0),
) -> Request:
    """Check and resolve one run's settings (raises :class:`UsageError` naming the fix).

    Defaults as ``python -m sdxl_jax.sample``: the model's size (1024 for SDXL), the
    checkpoint's scheduler as sampler (Euler for SDXL), guidance 5, 50 steps. ``init_image``
    (uint8 [H, W, 3]) makes it image-to-image at its own size; ``noise`` replaces the initial
    latents (float32 [N, C, H/8, W/8], as diffusers' ``latents``).
    """
    prompts = tuple(prompts)
    if not prompts:
        raise UsageError("no prompts given")
    if num_images < 1:
        raise UsageError("--num-images must be at least 1")
    if steps < 1:
        raise UsageError("--steps must be at least 1")
    if guidance < 0:
        raise UsageError("--guidance must be >= 0 (1 turns guidance off)")
    base, refiner = models.base, models.refiner
    if base.role == "refiner" and init_image is None:
        raise UsageError(
            f"--checkpoint {base.path} is an SDXL refiner: pass a base as --checkpoint "
            f"and this as --refiner, or give --init-image to refine an image with it"
        )
    if refiner is not None and not 0 < handoff < 1:
        raise UsageError(f"--handoff must be in (0, 1), got {handoff}")
    height, width = _size(models, height, width, init_image)
    original_size, crop = _micro_conditioning(original_size, crop)
    from sdxl_jax.inference.checkpoints import default_sampler

    sampler = sampler or default_sampler(base.path)
    # Each stage's scheduler config may ask for Karras sigmas (and more): sampler_steps reads it.
    kw = dict(spacing=spacing, karras=karras)
    img2img = init_image is not None
    try:
        end = handoff if refiner else None
        base_steps = sampler_steps(
            base.schedule, sampler, steps, strength=strength if img2img else None,
            denoising_end=end, **kw,
        )  # fmt: skip
        refiner_steps = None
        if refiner:
            refiner_steps = sampler_steps(
                refiner.schedule, sampler, steps, denoising_start=handoff, **kw
            )
    except ValueError as e:
        raise UsageError(str(e)) from e
    karras = base_steps.karras
    if noise is not None:
        _check_noise(models, noise, len(prompts) * num_images, height, width)
    return Request(
        prompts, negative_prompt, num_images, seed, height, width, guidance, steps, sampler,
        karras, base_steps, refiner_steps, handoff if refiner else None, init_image,
        strength if img2img else None, noise, original_size, crop,
    )  # fmt: skip


def _micro_conditioning(original_size, crop) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """``--original-size`` / ``--crop`` as int pairs (>= 0), or a :class:`UsageError`."""
    for name, v in (("--original-size", original_size), ("--crop", crop)):
        if v is not None and (len(v) != 2 or any(int(x) != x or x < 0 for x in v)):
            raise UsageError(f"{name} {v}: need two integers >= 0 (height width / top left)")
    size = tuple(int(x) for x in original_size) if original_size is not None else None
    return size, tuple(int(x) for x in crop)


def _check_noise(models: Models, noise: np.ndarray, n: int, height: int, width: int) -> None:
    """``--noise`` must be float32 [n images, channels, height/f, width/f]."""
    f, c = models.factor, models.base.configs["unet"].in_channels
    want = (n, c, height // f, width // f)
    if noise.shape != want or noise.dtype != np.float32:
        raise UsageError(
            f"--noise is {noise.dtype} {list(noise.shape)}; expected float32 {list(want)} "
            f"([images, channels, height/{f}, width/{f}])"
        )


def _size(
    models: Models, height: int | None, width: int | None, image: np.ndarray | None
) -> tuple[int, int]:
    """(height, width) in pixels: the init image's, given, or the model's default."""
    factor = models.factor
    unet = models.base.configs["unet"]
    default = unet.sample_size * factor
    if image is not None:
        height, width = image.shape[:2]
    else:
        height, width = height or default, width or default
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % factor:
            raise UsageError(
                f"--{name} {v} is not a positive multiple of {factor} (the VAE's downscale); "
                f"try {max(factor, v // factor * factor)}"
            )
    if (height, width) not in SDXL_BUCKETS and unet.sample_size == 128:
        warnings.warn(
            f"{height}x{width} is not one of SDXL's training sizes (e.g. 1024x1024, 832x1216, "
            f"1216x832); quality may suffer",
            stacklevel=3,
        )
    return height, width


@dataclasses.dataclass
class Batch:
    """One batch of a run's images: their indices in the request, images and settings."""

    indices: list[int]
    images: np.ndarray  # uint8 [n, H, W, 3]
    records: list[dict[str, Any]]
    seconds: float  # wall time of the batch (the first includes compilation)
    finite: np.ndarray  # bool [n]: False where the final latents hold NaN or inf (image void)


class NonFiniteError(RuntimeError):
    """Images whose latents came out NaN or inf: their pixels mean nothing."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)
        super().__init__(
            f"{len(self.indices)} image(s) came out non-finite (NaN or inf latents; indices "
            f"{self.indices[:8]}{' ...' if len(self.indices) > 8 else ''}): try --dtype fp32, "
            "another sampler or fewer steps, and check the checkpoint with "
            "python -m sdxl_jax.convert inspect"
        )


@dataclasses.dataclass
class Generation:
    """A finished run: every image in request order, its settings, and timings."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    records: list[dict[str, Any]]
    timings: dict[str, float]


class Generator:
    """Models loaded once onto a mesh; call it with requests (compiled once per shape).

    ``dtype``: UNet and text encoder weights and compute (auto: bf16 on GPU/TPU, fp32 on CPU);
    the VAE always runs in fp32. ``batch_size``: images per compiled call, rounded up to a
    multiple of the devices (default: one per device).
    """

    def __init__(
        self,
        models: Models,
        *,
        dtype: str = "auto",
        batch_size: int | None = None,
        vae_tile: int = 192,
        progress: bool = False,
        mesh: Any = None,
    ):
        import jax
        import jax.numpy as jnp

        from sdxl_jax.inference import runtime

        if dtype not in DTYPES:
            raise UsageError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if batch_size is not None and batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        t0 = time.perf_counter()
        self.models = models
        on_cpu = jax.default_backend() == "cpu"
        self.dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}.get(
            dtype, jnp.float32 if on_cpu else jnp.bfloat16
        )
        self.mesh = mesh if mesh is not None else runtime.make_mesh()
        n_dev = runtime.batch_devices(self.mesh)
        self.batch_size = runtime.padded(batch_size or n_dev, n_dev)
        self.progress = progress

        def stage(info: StageInfo, name: str) -> runtime.StageRunner:
            loaded = runtime.load_stage(
                info, dtype=self.dtype, tokenizers=models.tokenizers, progress=progress,
                loras=models.loras_for(name),
            )  # fmt: skip
            return runtime.StageRunner(loaded, self.mesh)

        self.base = stage(models.base, "base")
        self.refiner = stage(models.refiner, "refiner") if models.refiner is not None else None
        self.vae = runtime.load_vae(models.vae, self.mesh, progress=progress)
        self.vae.tile = vae_tile
        self.load_s = time.perf_counter() - t0

    def batches(self, request: Request) -> Iterator[Batch]:
        """Run ``request`` batch by batch (each padded to the compiled batch size)."""
        from tqdm import tqdm

        jobs = request.jobs
        bar = tqdm(total=len(jobs), unit="img", desc="sampling", disable=not self.progress)
        try:
            for start in range(0, len(jobs), self.batch_size):
                t0 = time.perf_counter()
                idx = list(range(start, min(start + self.batch_size, len(jobs))))
                # Padded with the last image: one compiled shape for every batch.
                full = idx + [idx[-1]] * (self.batch_size - len(idx))
                images, finite = self._run(request, [jobs[i][0] for i in full], full)
                records = [self._record(request, i, *jobs[i]) for i in idx]
                bar.update(len(idx))
                n = len(idx)
                yield Batch(idx, images[:n], records, time.perf_counter() - t0, finite[:n])
        finally:
            bar.close()

    def __call__(self, request: Request) -> Generation:
        """Run ``request``; all images in memory (use :meth:`batches` for large runs).
        Raises :class:`NonFiniteError` if any image's latents came out NaN or inf."""
        t0 = time.perf_counter()
        done = list(self.batches(request))
        bad = [i for b in done for i, ok in zip(b.indices, b.finite, strict=True) if not ok]
        if bad:
            raise NonFiniteError(bad)
        return Generation(
            images=np.concatenate([b.images for b in done]),
            records=[r for b in done for r in b.records],
            timings=self.timings([b.seconds for b in done], t0),
        )

    def timings(self, batch_seconds: list[float], started: float) -> dict[str, float]:
        """Load time, the first batch (with compilation), the steady state after it, and the
        total since ``started`` (a ``time.perf_counter()`` value)."""
        steady = float(np.mean(batch_seconds[1:] or batch_seconds))
        return dict(
            load_s=round(self.load_s, 3),
            first_batch_s=round(batch_seconds[0], 3),
            steady_batch_s=round(steady, 3),
            seconds_per_image=round(steady / self.batch_size, 4),
            total_s=round(time.perf_counter() - started, 3),
        )

    def _run(
        self, r: Request, prompts: list[str], full: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [batch, H, W, 3] of the padded batch ``full`` (image indices), and
        whether each one's final latents are finite."""
        from sdxl_jax.inference import runtime

        f = self.models.factor
        shape = (r.height // f, r.width // f, self.models.base.configs["unet"].in_channels)
        if r.noise is not None:
            noise = r.noise[full].transpose(0, 2, 3, 1)
        else:
            noise = runtime.initial_noise(r.seed, full, shape)
        negs = None if r.negative_prompt is None else [r.negative_prompt] * len(full)
        micro = dict(original_size=r.original_size, crop=r.crop)
        cond = self.base.conditioning(prompts, negs, r.height, r.width, r.use_cfg, **micro)
        if r.init_image is not None:
            images_in = np.broadcast_to(r.init_image, (len(full), *r.init_image.shape))
            keys = runtime.image_keys(r.seed, 0, full)
            x0 = self.vae.encode(np.ascontiguousarray(images_in), keys)
            x = r.base_steps.noised(np.asarray(x0), noise)
        else:
            x = noise * r.base_steps.init_scale
        # Per-image keys for euler_a's fresh noise: an image does not depend on its batch.
        keys = runtime.image_keys(r.seed, 1, full)
        x = self.base.denoise(np.asarray(x, np.float32), r.base_steps, cond, r.guidance, keys)
        if self.refiner is not None and r.refiner_steps is not None:
            rcond = self.refiner.conditioning(prompts, negs, r.height, r.width, r.use_cfg, **micro)
            keys = runtime.image_keys(r.seed, 2, full)
            x = self.refiner.denoise(x, r.refiner_steps, rcond, r.guidance, keys)
        finite = np.isfinite(np.asarray(x)).reshape(len(full), -1).all(axis=1)
        return self.vae.decode(x), finite

    def _record(self, r: Request, index: int, prompt: str, k: int) -> dict[str, Any]:
        """The settings of image ``index`` (the PNG text chunk and manifest entry)."""
        return dict(
            index=index, prompt=prompt, negative_prompt=r.negative_prompt, image_of_prompt=k,
            seed=r.seed, height=r.height, width=r.width, steps=r.steps, sampler=r.sampler,
            karras=r.karras, guidance=r.guidance, checkpoint=str(self.models.base.path),
            refiner=str(self.models.refiner.path) if self.models.refiner else None,
            handoff=r.handoff, strength=r.strength,
            original_size=list(r.original_size or (r.height, r.width)), crop=list(r.crop),
        )  # fmt: skip


def generate(
    prompts: Sequence[str],
    checkpoint: str | Path,
    *,
    refiner: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizers: str | Path | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    lora_strict: bool = True,
    dtype: str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    **settings: Any,
) -> Generation:
    """Images of ``prompts`` from ``checkpoint`` (and ``refiner``) in one call.

    ``settings`` are :func:`make_request`'s (steps, guidance, sampler, height, width, seed,
    num_images, negative_prompt, init_image, strength, handoff, noise, original_size, crop).
    To generate several times with the same models, build a :class:`Generator` once.
    """
    models = check_models(
        checkpoint, refiner=refiner, vae=vae, tokenizers=tokenizers, loras=loras,
        lora_strict=lora_strict,
    )  # fmt: skip
    request = make_request(models, prompts, **settings)
    return Generator(models, dtype=dtype, batch_size=batch_size, progress=progress)(request)
