"""diffusers' schedulers as the reference for the sampling plans and samplers.

One factory for the scheduler of each sampler, and the windows diffusers' SDXL pipelines cut from
a scheduler's timesteps: img2img strength / the refiner's ``denoising_start``
(``StableDiffusionXLImg2ImgPipeline.get_timesteps``) and the base's ``denoising_end``.
"""

from __future__ import annotations

import types
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
)

from sdxl_jax.diffusion.schedule import SDXL_SCHEDULER_CONFIG

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def make_scheduler(
    sampler: str,
    spacing: str | None = None,
    karras: bool = False,
    config: dict[str, Any] | None = None,
):
    """diffusers' scheduler for ``sampler`` from ``config`` (SDXL's published one by default),
    as ``from_config`` builds it (absent settings: the class's defaults; DPM's are dpmsolver++,
    order 2); ``spacing`` / ``karras`` override the config's timestep_spacing /
    use_karras_sigmas."""
    if sampler not in SCHEDULERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {tuple(SCHEDULERS)}")
    kw: dict[str, Any] = {}
    if spacing is not None:
        kw["timestep_spacing"] = spacing
    if karras:
        kw["use_karras_sigmas"] = True
    return SCHEDULERS[sampler].from_config(config or SDXL_SCHEDULER_CONFIG, **kw)


def img2img_window(sched, steps: int, strength: float = 1.0, denoising_start=None):
    """(first step, number of steps) of diffusers' img2img / refiner window; sets the
    scheduler's begin index as the pipeline does."""
    holder = types.SimpleNamespace(scheduler=sched)
    ts, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        holder, steps, strength, "cpu", denoising_start=denoising_start
    )
    return len(sched.timesteps) - len(ts), n


def base_stop(sched, denoising_end: float) -> int:
    """The SDXL base pipeline's denoising_end rule: how many timesteps are >= the cutoff."""
    n_train = sched.config.num_train_timesteps
    cutoff = int(round(n_train - denoising_end * n_train))
    return len([t for t in sched.timesteps if t >= cutoff])
