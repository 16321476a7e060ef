"""The discrete DDPM noise schedule and the inference plans the samplers walk.

Everything here is host-side numpy, computed once per (sampler, steps, window) before the
compiled loop starts. Timesteps and sigmas follow the diffusers schedulers' conventions
exactly (spacing, ``steps_offset``, Karras sigmas, img2img strength, the base/refiner hand-off),
because the sampling parity tests demand the same images from the same noise.

Notation: ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (the variance-exploding noise level,
Karras et al. 2022); a variance-preserving state is ``x_vp = x_ve / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
SPACINGS = ("leading", "trailing", "linspace")
# Samplers whose state is variance preserving (diffusers: init_noise_sigma == 1).
VP_SAMPLERS = ("ddim", "dpmpp_2m")
KARRAS_SAMPLERS = ("euler", "dpmpp_2m")
# diffusers scheduler settings that change sampling, with the only value implemented here.
UNSUPPORTED_SCHEDULER_SETTINGS = {
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "clip_sample": False,
    "thresholding": False,
    "set_alpha_to_one": False,
}


# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscrete). The
# keys Euler ignores (clip_sample, set_alpha_to_one) matter when diffusers builds another
# scheduler from it: DDIMScheduler.from_config then gets SDXL's values, not DDIM's defaults.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule; SDXL's is ``scaled_linear`` 0.00085 -> 0.012 over 1000."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    use_karras_sigmas: bool = False

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not supported: use scaled_linear "
                f"(SDXL's) or linear"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported: use epsilon or "
                f"v_prediction"
            )
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r}: use one of {SPACINGS}")

    @classmethod
    def from_scheduler_config(cls, d: dict[str, Any]) -> NoiseSchedule:
        """From a diffusers ``scheduler_config.json`` (any of its scheduler classes)."""
        if d.get("trained_betas") is not None:
            raise ValueError("scheduler config has trained_betas; sdxl_jax needs a beta_schedule")
        changed = {
            k: d[k] for k, ok in UNSUPPORTED_SCHEDULER_SETTINGS.items() if k in d and d[k] != ok
        }
        if changed:
            raise ValueError(
                f"scheduler_config.json sets {changed}, which sdxl_jax's samplers do not "
                f"implement (they would sample differently from diffusers); supported values: "
                f"{ {k: UNSUPPORTED_SCHEDULER_SETTINGS[k] for k in changed} }"
            )
        keys = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in keys})

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> NoiseSchedule:
        """The checkpoint's ``scheduler/scheduler_config.json``, or SDXL's defaults without one."""
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        if Path(folder).is_dir() and path.exists():
            return cls.from_scheduler_config(json.loads(path.read_text()))
        return cls()

    @property
    def alphas_cumprod(self) -> np.ndarray:  # [T] float64
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        return np.cumprod(1.0 - betas)

    @property
    def sigmas(self) -> np.ndarray:  # [T] float64, increasing with t
        a = self.alphas_cumprod
        return np.sqrt((1.0 - a) / a)

    def sigma_at(self, t: np.ndarray) -> np.ndarray:
        """Sigma at (fractional) timesteps, interpolated linearly as diffusers does."""
        return np.interp(t, np.arange(self.num_train_timesteps), self.sigmas)

    def t_at(self, sigma: np.ndarray) -> np.ndarray:
        """Fractional timestep of each sigma, linear in log sigma (diffusers' _sigma_to_t)."""
        log_sigmas = np.log(self.sigmas)
        log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
        idx = np.searchsorted(log_sigmas, log_sigma, side="right") - 1
        low = np.clip(idx, 0, len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def timesteps(self, steps: int, spacing: str | None = None, *, plus_one: bool = False):
        """The spaced timesteps, descending. ``plus_one``: DPM-Solver's leading/linspace variant."""
        spacing = spacing or self.timestep_spacing
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in [1, {n}], got {steps}")
        if spacing == "leading":
            k = steps + 1 if plus_one else steps
            ts = (np.arange(0, k) * (n // k)).round()[::-1]
            ts = (ts[:-1] if plus_one else ts) + self.steps_offset
        elif spacing == "trailing":
            ts = np.arange(n, 0, -n / steps).round() - 1
        elif spacing == "linspace":
            if plus_one:
                ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
            else:
                ts = np.linspace(0, n - 1, steps)[::-1]
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {SPACINGS}")
        return np.ascontiguousarray(ts, dtype=np.float64)


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: ``steps`` sigmas from sigma_max to sigma_min, descending."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


@dataclasses.dataclass(frozen=True)
class SamplerSteps:
    """The steps one sampler run takes (all arrays [n], float64 on the host).

    Step i calls the model at timestep ``t[i]`` on a state at noise level ``sigma[i]`` and moves
    it to ``sigma_next[i]``. ``order[i]`` is DPM-Solver's order for the step (1 or 2).
    ``init_scale`` multiplies unit noise to start from pure noise (diffusers' init_noise_sigma).
    """

    sampler: str
    t: np.ndarray
    sigma: np.ndarray
    sigma_next: np.ndarray
    order: np.ndarray
    init_scale: float

    @property
    def steps(self) -> int:
        return len(self.t)

    @property
    def vp(self) -> bool:
        """Whether the sampler's state is variance preserving (else x0 + sigma * noise)."""
        return self.sampler in VP_SAMPLERS

    def arrays(self) -> dict[str, np.ndarray]:
        """float32 arrays for the compiled loop."""
        return {
            "t": self.t.astype(np.float32),
            "sigma": self.sigma.astype(np.float32),
            "sigma_next": self.sigma_next.astype(np.float32),
            "order": self.order.astype(np.int32),
        }

    def noised(self, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """The sampler's start state for clean latents ``x0`` at this plan's first noise level."""
        s = self.sigma[0]
        x = x0 + s * noise
        return x / np.sqrt(1 + s * s) if self.vp else x


def sampler_steps(
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    *,
    spacing: str | None = None,
    karras: bool = False,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
) -> SamplerSteps:
    """The timesteps of ``steps`` sampling steps, windowed for img2img or a hand-off.

    ``strength`` (img2img) keeps the last ``int(steps * strength)`` steps. ``denoising_end``
    (base before a refiner) keeps the steps at t >= T * (1 - end); ``denoising_start`` (the
    refiner) keeps the steps below that cutoff, as diffusers' SDXL pipelines do.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"Karras sigmas are available for {KARRAS_SAMPLERS}, not {sampler}")
    spacing = spacing or schedule.timestep_spacing
    t, sigma, sigma_next = _full_steps(schedule, sampler, steps, spacing, karras)
    if sampler in VP_SAMPLERS:
        init_scale = 1.0
    elif spacing in ("linspace", "trailing"):
        init_scale = float(sigma.max())
    else:
        init_scale = float(np.sqrt(sigma.max() ** 2 + 1))
    n = len(t)
    start, stop = _window(
        t, steps, schedule.num_train_timesteps, strength, denoising_start, denoising_end
    )
    # DPM-Solver++(2M) restarts at first order and ends at first order onto sigma = 0.
    order = np.full(n, 2)
    order[start] = 1
    order[n - 1] = 1
    sl = slice(start, stop)
    return SamplerSteps(sampler, t[sl], sigma[sl], sigma_next[sl], order[sl], init_scale)


def _full_steps(
    schedule: NoiseSchedule, sampler: str, steps: int, spacing: str, karras: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, sigma, sigma_next) [steps] of a whole run, before any img2img or hand-off window."""
    n_train = schedule.num_train_timesteps
    all_sigmas = schedule.sigmas
    if sampler == "ddim":
        t = schedule.timesteps(steps, spacing).round()
        if t.max() >= n_train:
            raise ValueError(
                f"{steps} {spacing} DDIM steps reach t = {int(t.max())} >= {n_train}: use fewer "
                f"steps or trailing/linspace spacing"
            )
        prev = t - n_train // steps
        sigma = all_sigmas[t.astype(int)]
        # DDIM steps to t - T // steps; below 0 to alpha_bar[0] (set_alpha_to_one=False).
        sigma_next = np.where(prev >= 0, all_sigmas[np.maximum(prev, 0).astype(int)], all_sigmas[0])
        return t, sigma, sigma_next
    if sampler == "dpmpp_2m":
        if karras:
            sig = karras_sigmas(all_sigmas[-1], all_sigmas[0], steps)
            t = schedule.t_at(sig).round()
        else:
            t = schedule.timesteps(steps, spacing, plus_one=True).round()
            sig = schedule.sigma_at(t)
        return t, sig, np.append(sig[1:], 0.0)
    t = schedule.timesteps(steps, spacing)
    sig = schedule.sigma_at(t)
    if karras:
        sig = karras_sigmas(sig[0], sig[-1], steps)
        t = schedule.t_at(sig)
    return t, sig, np.append(sig[1:], 0.0)


def _window(
    t: np.ndarray,
    steps: int,
    n_train: int,
    strength: float | None,
    denoising_start: float | None,
    denoising_end: float | None,
) -> tuple[int, int]:
    """[start, stop) of the steps that run: img2img keeps the last ``steps * strength``; a
    hand-off splits at t = T * (1 - fraction) as diffusers' SDXL pipelines do."""
    n = len(t)
    start, stop = 0, n
    if denoising_end is not None:
        if not 0 < denoising_end < 1:
            raise ValueError(f"denoising_end must be in (0, 1), got {denoising_end}")
        cutoff = int(round(n_train - denoising_end * n_train))
        stop = int(np.sum(t >= cutoff))
    if denoising_start is not None:
        if not 0 < denoising_start < 1:
            raise ValueError(f"denoising_start must be in (0, 1), got {denoising_start}")
        cutoff = int(round(n_train - denoising_start * n_train))
        start = n - int(np.sum(t < cutoff))
    elif strength is not None:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        start = n - min(int(steps * strength), steps)
    if start >= stop:
        raise ValueError(
            f"no steps left: {steps} steps with strength={strength}, "
            f"denoising_start={denoising_start}, denoising_end={denoising_end}; use more steps"
        )
    return start, stop
