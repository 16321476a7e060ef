"""How diffusers' schedulers read a ``scheduler_config.json``, for each sampler's class.

``SchedulerClass.from_config(cfg)`` takes a setting from ``cfg`` when the key is there (and not
listed in ``cfg["_use_default_values"]``), else the class's own default, and the classes differ:
DDIM clips x0 to [-1, 1] and ends at alpha_bar = 1 unless told otherwise, SDXL's published config
(an Euler one) tells it otherwise, an ``EulerDiscreteScheduler()`` saved from code does not.
:func:`resolve` gives every setting a sampler's class reads, resolved the same way, and refuses in
one line a value the sampler does not implement. Defaults: diffusers 0.42's ``__init__``s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# Each sampler's diffusers scheduler (DPM++ 2M: DPMSolverMultistepScheduler, dpmsolver++, order 2).
SAMPLER_CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}

# Settings all four classes read, with the same default in each.
COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
_THRESHOLDING = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
# The other settings each class reads, with that class's defaults. DPMSolverMultistep has no
# sigma_min / sigma_max of its own, but its Karras sigmas read them from the config it was made
# from (from_config keeps unknown keys in .config): they count as its settings, default None.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": {
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        **_THRESHOLDING,
    },
    "euler": {
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        **_SIGMAS,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    "euler_a": {"timestep_spacing": "linspace"},
    "dpmpp_2m": {
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        **_SIGMAS,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        **_THRESHOLDING,
    },
}

# The values implemented for settings that have a fixed set. diffusers itself runs DPM's
# algorithm_type "deis" as dpmsolver++ and solver_type logrho / bh1 / bh2 as midpoint.
SUPPORTED: dict[str, tuple[Any, ...]] = {
    "beta_schedule": ("scaled_linear", "linear"),
    "trained_betas": (None,),
    "prediction_type": ("epsilon", "v_prediction"),
    "rescale_betas_zero_snr": (False,),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "interpolation_type": ("linear",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "timestep_type": ("discrete", "continuous"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "solver_order": (1, 2),
    "algorithm_type": ("dpmsolver++", "deis"),
    "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
    "variance_type": (None,),
}


def given(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``config`` gives, as ``from_config`` sees them: no ``_``-keys, and none that
    ``_use_default_values`` lists (those were defaults of the class that saved it)."""
    defaulted = set(config.get("_use_default_values") or ())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}


def unsupported(key: str, value: Any, supported: str, sampler: str | None = None) -> ValueError:
    """The one-line refusal of a setting's value (for one sampler, or for all of them)."""
    who = "sdxl_jax"
    if sampler:
        who = f"the {sampler} sampler (diffusers' {SAMPLER_CLASSES[sampler]})"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return ValueError(
        f"scheduler_config.json sets {key}={shown}, which {who} does not implement; supported: "
        f"{supported}" + (" (or pick another --sampler)" if sampler else "")
    )


def check_common(s: Mapping[str, Any]) -> None:
    """Refuse values of the settings every class reads (before any sampler is chosen)."""
    for key in COMMON_DEFAULTS:
        if key in s and key in SUPPORTED and not any(_same(s[key], v) for v in SUPPORTED[key]):
            raise unsupported(key, s[key], ", ".join(map(repr, SUPPORTED[key])))


def resolve(config: Mapping[str, Any], sampler: str) -> dict[str, Any]:
    """Every setting ``sampler``'s diffusers class reads, from ``config`` or that class's
    defaults; ValueError naming the key and the supported values for one not implemented."""
    defaults = {**COMMON_DEFAULTS, **CLASS_DEFAULTS[sampler]}
    cfg = given(config)
    s = {k: cfg[k] if k in cfg else d for k, d in defaults.items()}
    for key, ok in SUPPORTED.items():
        if key in s and not any(_same(s[key], v) for v in ok):
            raise unsupported(key, s[key], ", ".join(map(repr, ok)), sampler)
    if s.get("timestep_type") == "continuous" and s["prediction_type"] == "v_prediction":
        # Euler then feeds the UNet 0.25 log(sigma) as its timestep (EDM-style v models).
        raise unsupported("timestep_type", "continuous", "'discrete' with v_prediction", sampler)
    if s.get("thresholding") and not 0 <= s["dynamic_thresholding_ratio"] <= 1:
        ratio = s["dynamic_thresholding_ratio"]
        raise unsupported("dynamic_thresholding_ratio", ratio, "a quantile in [0, 1]", sampler)
    if sampler == "dpmpp_2m":
        _check_lambda_clip(s)
    return s


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 2 == 2.0 and False == 0, but None only equals None."""
    return a is b if a is None or b is None else a == b


def _check_lambda_clip(s: dict[str, Any]) -> None:
    """DPM-Solver drops the timesteps whose half-log-SNR lambda is below ``lambda_min_clipped``
    (for cosine schedules); implemented only where that drops none."""
    n, lo, hi = s["num_train_timesteps"], s["beta_start"], s["beta_end"]
    if s["beta_schedule"] == "scaled_linear":
        betas = np.linspace(lo**0.5, hi**0.5, n, dtype=np.float64) ** 2
    else:
        betas = np.linspace(lo, hi, n, dtype=np.float64)
    a = np.cumprod(1.0 - betas)[-1]
    lambda_min = 0.5 * math.log(a / (1 - a))
    if s["lambda_min_clipped"] > lambda_min:
        raise unsupported(
            "lambda_min_clipped",
            s["lambda_min_clipped"],
            f"<= {lambda_min:.4f} (this schedule's lowest lambda: no timestep clipped)",
            "dpmpp_2m",
        )
