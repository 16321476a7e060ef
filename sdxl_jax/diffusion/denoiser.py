"""The denoiser interface around a noise-predicting network, and classifier-free guidance.

A *model* maps ``(x_vp, t) -> prediction`` (epsilon or v); a *denoiser* maps
``(x_vp, t, sigma) -> (x0, eps)``, which is what every sampler consumes. Guidance wraps a
conditional model into an unconditional-plus-scaled-difference one (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion.samplers import Denoiser

Model = Callable[[jax.Array, jax.Array], jax.Array]  # (x_vp [B,h,w,C], t []) -> prediction
CondModel = Callable[[jax.Array, jax.Array, Any], jax.Array]  # (x_vp, t, cond) -> prediction


def denoiser(model: Model, prediction_type: str = "epsilon") -> Denoiser:
    """(x0, eps) from a model predicting epsilon or v (Salimans & Ho 2022: v = a eps - s x0)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")

    def denoise(x: jax.Array, t: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = model(x, t).astype(jnp.float32)
        a = jax.lax.rsqrt(1.0 + sigma * sigma)  # sqrt(alpha_bar)
        s = sigma * a  # sqrt(1 - alpha_bar)
        if prediction_type == "epsilon":
            return (x - s * out) / a, out
        return a * x - s * out, s * x + a * out

    return denoise


def guided(model: CondModel, cond: Any, uncond: Any, scale: float | jax.Array) -> Model:
    """Classifier-free guidance: uncond + scale * (cond - uncond), one batched call.

    ``cond`` and ``uncond`` are pytrees with a leading batch axis matching ``x``. The batch is
    stacked as [uncond; cond] (diffusers' order), so both halves see identical inputs.
    """
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

    def guided_model(x: jax.Array, t: jax.Array) -> jax.Array:
        out = model(jnp.concatenate([x, x], axis=0), t, both).astype(jnp.float32)
        u, c = jnp.split(out, 2, axis=0)
        return u + scale * (c - u)

    return guided_model


def conditional(model: CondModel, cond: Any) -> Model:
    """The model at fixed conditioning (guidance scale 1: no unconditional pass)."""
    return lambda x, t: model(x, t, cond)
