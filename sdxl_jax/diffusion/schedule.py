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
import math
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.diffusion.scheduler_config import (
    COMMON_DEFAULTS,
    SAMPLER_CLASSES,
    check_common,
    given,
    resolve,
)

SAMPLERS = tuple(SAMPLER_CLASSES)  # ("ddim", "euler", "euler_a", "dpmpp_2m")
SPACINGS = ("leading", "trailing", "linspace")
# Samplers whose state is variance preserving (diffusers: init_noise_sigma == 1).
VP_SAMPLERS = ("ddim", "dpmpp_2m")
KARRAS_SAMPLERS = ("euler", "dpmpp_2m")


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
# The settings NoiseSchedule holds as fields; it keeps the rest of a config as ``options``.
_FIELDS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
    "timestep_spacing", "steps_offset", "use_karras_sigmas",
)  # fmt: skip


def _split(config: dict[str, Any]) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]]:
    """(NoiseSchedule's fields, the other settings as sorted (key, value) pairs) of a config.
    Absent settings that every class defaults alike take that default; timestep_spacing, whose
    default differs between classes, stays None (each sampler's class default)."""
    cfg = given(config)
    check_common(cfg)
    for key in ("trained_betas", "rescale_betas_zero_snr"):  # refused above unless the default
        cfg.pop(key, None)
    fields = {k: cfg.pop(k, COMMON_DEFAULTS.get(k)) for k in _FIELDS}
    fields["use_karras_sigmas"] = bool(fields["use_karras_sigmas"])
    frozen = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 (hashable)
    return fields, tuple(sorted((k, frozen(v)) for k, v in cfg.items()))


_SDXL_OPTIONS = _split(SDXL_SCHEDULER_CONFIG)[1]


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule (SDXL's: ``scaled_linear`` 0.00085 -> 0.012 over 1000) and the
    scheduler settings sampling reads, SDXL's published ones by default.

    ``timestep_spacing=None``: each sampler's diffusers class default (DDIM: leading, the others:
    linspace). ``options``: the config's other settings, as given; a sampler reads those its
    diffusers class reads and takes that class's defaults for the absent ones (:func:`resolve`).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = "leading"
    steps_offset: int = 1
    use_karras_sigmas: bool = False
    options: tuple[tuple[str, Any], ...] = _SDXL_OPTIONS

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
        if self.timestep_spacing not in (*SPACINGS, None):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r}: use one of {SPACINGS}")

    @classmethod
    def from_scheduler_config(cls, d: dict[str, Any]) -> NoiseSchedule:
        """From a diffusers ``scheduler_config.json`` (any of its scheduler classes); a value no
        sampler implements (trained_betas, rescale_betas_zero_snr, ...) raises ValueError."""
        fields, options = _split(d)
        return cls(**fields, options=options)

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> NoiseSchedule:
        """The checkpoint's ``scheduler/scheduler_config.json``, or SDXL's defaults without one."""
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        if Path(folder).is_dir() and path.exists():
            return cls.from_scheduler_config(json.loads(path.read_text()))
        return cls()

    @property
    def config(self) -> dict[str, Any]:
        """The scheduler settings given (an absent timestep_spacing stays absent)."""
        d = {**dict(self.options), **{k: getattr(self, k) for k in _FIELDS}}
        if self.timestep_spacing is None:
            del d["timestep_spacing"]
        return d

    def settings(self, sampler: str, **overrides: Any) -> dict[str, Any]:
        """Every setting of ``sampler``'s diffusers class as ``Class.from_config(config,
        **overrides)`` has it; ValueError for a value the sampler does not implement."""
        return resolve({**self.config, **overrides}, sampler)

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
    ``clip``: DDIM's clip_sample, predicted x0 clipped to [-clip, clip] (inf: not clipped);
    ``threshold``: (quantile, max) of dynamic thresholding (DDIM, DPM++), None: off.
    """

    sampler: str
    t: np.ndarray
    sigma: np.ndarray
    sigma_next: np.ndarray
    order: np.ndarray
    init_scale: float
    karras: bool = False
    clip: float = math.inf
    threshold: tuple[float, float] | None = None

    @property
    def steps(self) -> int:
        return len(self.t)

    @property
    def vp(self) -> bool:
        """Whether the sampler's state is variance preserving (else x0 + sigma * noise)."""
        return self.sampler in VP_SAMPLERS

    def arrays(self) -> dict[str, np.ndarray]:
        """float32 arrays for the compiled loop (one program whatever clip / threshold are)."""
        return {
            "t": self.t.astype(np.float32),
            "sigma": self.sigma.astype(np.float32),
            "sigma_next": self.sigma_next.astype(np.float32),
            "order": self.order.astype(np.int32),
            "clip": np.float32(self.clip),  # []
            "threshold": np.array(self.threshold or (-1.0, 1.0), np.float32),  # [2]; < 0: off
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

    Settings as diffusers' scheduler for ``sampler`` built with ``from_config`` from the
    schedule's config; ``spacing`` / ``karras=True`` override its timestep_spacing /
    use_karras_sigmas. ``strength`` (img2img) keeps the last ``int(steps * strength)`` steps.
    ``denoising_end`` (base before a refiner) keeps the steps at t >= T * (1 - end);
    ``denoising_start`` (the refiner) keeps the steps below that cutoff, as diffusers' SDXL
    pipelines do.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ValueError(f"Karras sigmas are available for {KARRAS_SAMPLERS}, not {sampler}")
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {SPACINGS}")
    over = {"timestep_spacing": spacing} if spacing else {}
    s = schedule.settings(sampler, **over, **({"use_karras_sigmas": True} if karras else {}))
    t, sigma, sigma_next = _full_steps(schedule, sampler, steps, s)
    if sampler in VP_SAMPLERS:
        init_scale = 1.0
    elif s["timestep_spacing"] in ("linspace", "trailing"):
        init_scale = float(sigma.max())
    else:
        init_scale = float(np.sqrt(sigma.max() ** 2 + 1))
    n = len(t)
    start, stop = _window(
        t, steps, schedule.num_train_timesteps, strength, denoising_start, denoising_end
    )
    # DPM-Solver's step(): first order at a run's first step and, as set, at the last.
    order = np.full(n, s.get("solver_order", 2))
    order[start] = 1
    if (
        s.get("euler_at_final")
        or (s.get("lower_order_final", True) and n < 15)
        or s.get("final_sigmas_type", "zero") == "zero"
    ):
        order[n - 1] = 1
    clip, threshold = math.inf, None
    if s.get("thresholding"):  # before clip_sample, as in DDIMScheduler.step
        threshold = (float(s["dynamic_thresholding_ratio"]), float(s["sample_max_value"]))
    elif s.get("clip_sample"):
        clip = float(s["clip_sample_range"])
    sl = slice(start, stop)
    karras = bool(s.get("use_karras_sigmas"))
    return SamplerSteps(
        sampler, t[sl], sigma[sl], sigma_next[sl], order[sl], init_scale, karras, clip, threshold
    )


def _full_steps(
    schedule: NoiseSchedule, sampler: str, steps: int, s: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, sigma, sigma_next) [steps] of a whole run, before any img2img or hand-off window;
    ``s``: the sampler's settings (NoiseSchedule.settings)."""
    n_train = schedule.num_train_timesteps
    all_sigmas = schedule.sigmas
    spacing, karras = s["timestep_spacing"], s.get("use_karras_sigmas", False)
    # The last step goes to sigma = 0, or to sigma(t=0) (final_sigmas_type="sigma_min").
    last = all_sigmas[0] if s.get("final_sigmas_type") == "sigma_min" else 0.0
    if sampler == "ddim":
        t = schedule.timesteps(steps, spacing).round()
        if t.max() >= n_train:
            raise ValueError(
                f"{steps} {spacing} DDIM steps reach t = {int(t.max())} >= {n_train}: use fewer "
                f"steps or trailing/linspace spacing"
            )
        prev = t - n_train // steps
        sigma = all_sigmas[t.astype(int)]
        # DDIM steps to t - T // steps; below 0 to alpha_bar = 1 (set_alpha_to_one) or [0].
        final = 0.0 if s["set_alpha_to_one"] else all_sigmas[0]
        sigma_next = np.where(prev >= 0, all_sigmas[np.maximum(prev, 0).astype(int)], final)
        return t, sigma, sigma_next
    if sampler == "dpmpp_2m":
        if karras:
            sig = karras_sigmas(*_karras_range(s, all_sigmas[-1], all_sigmas[0]), steps)
            t = schedule.t_at(sig).round()
        else:
            t = schedule.timesteps(steps, spacing, plus_one=True).round()
            sig = schedule.sigma_at(t)
        return t, sig, np.append(sig[1:], last)
    t = schedule.timesteps(steps, spacing)
    sig = schedule.sigma_at(t)
    if karras:
        sig = karras_sigmas(*_karras_range(s, sig[0], sig[-1]), steps)
        t = schedule.t_at(sig)
    return t, sig, np.append(sig[1:], last)


def _karras_range(s: dict[str, Any], sigma_max: float, sigma_min: float) -> tuple[float, float]:
    """(sigma_max, sigma_min) of Karras sigmas: the config's, where it sets them."""
    hi, lo = s.get("sigma_max"), s.get("sigma_min")
    return (sigma_max if hi is None else hi), (sigma_min if lo is None else lo)


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
