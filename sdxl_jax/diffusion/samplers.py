"""Samplers: small pure functions over a denoiser and a precomputed :class:`SamplerSteps`.

A denoiser maps ``(x_vp, t, sigma) -> (x0, eps)``: a variance-preserving state (what the UNet
takes as input), its timestep and noise level, to the predicted clean latents and noise
(:func:`sdxl_jax.diffusion.denoiser.denoiser`). Each sampler keeps its own state convention, the
one diffusers' scheduler keeps, so a base run handed to a refiner continues exactly:
DDIM and DPM-Solver++ hold ``x_vp``; Euler and Euler ancestral hold ``x0 + sigma * noise``.

The whole loop runs under ``lax.fori_loop``: one compiled program per (sampler, steps, shape).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdxl_jax.diffusion.schedule import SamplerSteps

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# SamplerSteps.arrays(): t, sigma, sigma_next [n] f32, order [n] i32, clip [] f32, threshold [2] f32
Arrays = dict[str, jax.Array]


def _vp_scale(sigma: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(1.0 + sigma * sigma)  # alpha = sqrt(alpha_bar)


def _limit_x0(x0: jax.Array, p: Arrays) -> jax.Array:
    """The predicted x0 clipped to [-clip, clip] (diffusers' clip_sample; inf: unchanged), or
    dynamically thresholded (Saharia et al. 2022, "Imagen", sec. 2.3; diffusers' thresholding):
    per sample, s = the quantile of |x0| clamped to [1, max]; x0 -> clip(x0, -s, s) / s."""
    q, top = p["threshold"][0], p["threshold"][1]

    def threshold(x0):
        flat = jnp.abs(x0.reshape(x0.shape[0], -1)) if x0.ndim > 1 else jnp.abs(x0)[:, None]
        s = jnp.minimum(jnp.maximum(jnp.quantile(flat, q, axis=1), 1.0), top)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.clip(x0, -s, s) / s

    x0 = jnp.clip(x0, -p["clip"], p["clip"])
    return jax.lax.cond(q >= 0, threshold, lambda x: x, x0)


def ddim(denoise: Denoiser, x: jax.Array, p: Arrays, key: jax.Array | None = None) -> jax.Array:
    """Deterministic DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eta = 0).

    x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * eps, on the VP state, with x0 clipped
    or thresholded as the plan says.
    """

    def body(i, x):
        x0, eps = denoise(x, p["t"][i], p["sigma"][i])
        x0 = _limit_x0(x0, p)  # eps stays the model's (use_clipped_model_output=False)
        a_next = _vp_scale(p["sigma_next"][i])
        return a_next * x0 + p["sigma_next"][i] * a_next * eps

    return jax.lax.fori_loop(0, p["t"].shape[0], body, x)


def euler(denoise: Denoiser, x: jax.Array, p: Arrays, key: jax.Array | None = None) -> jax.Array:
    """Euler's method on the probability-flow ODE dx/dsigma = eps (Karras et al. 2022, Alg. 1)."""

    def body(i, x):
        s, s_next = p["sigma"][i], p["sigma_next"][i]
        x0, _ = denoise(x * _vp_scale(s), p["t"][i], s)
        return x + (x - x0) / s * (s_next - s)

    return jax.lax.fori_loop(0, p["t"].shape[0], body, x)


def _noise(key: jax.Array, i: jax.Array, x: jax.Array) -> jax.Array:
    """Step i's fresh noise: from one key, or from one key per sample ([B] keys), so that a
    sample's noise does not depend on the batch it runs in."""
    if key.ndim == 0:
        return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    one = lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype)  # noqa: E731
    return jax.vmap(one)(key)


def euler_ancestral(denoise: Denoiser, x: jax.Array, p: Arrays, key: jax.Array) -> jax.Array:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``, eta = 1).

    Step down to sigma_down with Euler, then add fresh noise of sigma_up, where
    sigma_up^2 + sigma_down^2 = sigma_next^2 matches the DDPM posterior's variance.
    """
    if key is None:
        raise ValueError("euler_a draws fresh noise each step: pass a PRNG key (or [B] keys)")

    def body(i, x):
        s, s_next = p["sigma"][i], p["sigma_next"][i]
        x0, _ = denoise(x * _vp_scale(s), p["t"][i], s)
        up = jnp.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        down = jnp.sqrt(s_next**2 - up**2)
        x = x + (x - x0) / s * (down - s)
        return x + up * _noise(key, i, x)

    return jax.lax.fori_loop(0, p["t"].shape[0], body, x)


def dpmpp_2m(denoise: Denoiser, x: jax.Array, p: Arrays, key: jax.Array | None = None) -> jax.Array:
    """DPM-Solver++(2M), multistep midpoint form (Lu et al. 2022, arXiv 2211.01095, Alg. 2).

    In half-log-SNR lambda = -log sigma: x_t = (s_t / s_s) x - alpha_t (e^-h - 1) D, with
    D = x0 at first order and x0 + (x0 - x0_prev) / (2 r) at second, r = h_prev / h.
    """

    def body(i, carry):
        x, x0_prev, s_prev = carry
        s, s_next = p["sigma"][i], p["sigma_next"][i]
        x0 = _limit_x0(denoise(x, p["t"][i], s)[0], p)
        a_next = _vp_scale(s_next)
        ratio = s_next / s  # e^-h; exactly 0 onto sigma = 0
        h = jnp.log(s) - jnp.log(jnp.maximum(s_next, 1e-30))
        r = (jnp.log(s_prev) - jnp.log(s)) / h
        second = x0 + (x0 - x0_prev) / (2.0 * r)
        d = jnp.where(p["order"][i] == 2, second, x0)
        x = ratio * (a_next / _vp_scale(s)) * x - a_next * (ratio - 1.0) * d
        return x, x0, s

    init = (x, jnp.zeros_like(x), p["sigma"][0])
    return jax.lax.fori_loop(0, p["t"].shape[0], body, init)[0]


SAMPLER_FNS: dict[str, Callable[..., jax.Array]] = {
    "ddim": ddim,
    "euler": euler,
    "euler_a": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
}


def sample(
    sampler: str, denoise: Denoiser, x: jax.Array, p: Arrays, key: jax.Array | None = None
) -> jax.Array:
    """Run ``sampler`` over the plan's arrays from state ``x`` (traceable; jit the caller)."""
    return SAMPLER_FNS[sampler](denoise, x, p, key)


def run_steps(
    denoise: Denoiser, x: jax.Array, plan: SamplerSteps, key: jax.Array | None = None
) -> jax.Array:
    """Convenience for tests and small models: jit and run one plan."""
    arrays = {k: jnp.asarray(v) for k, v in plan.arrays().items()}
    return jax.jit(lambda x, a, k: sample(plan.sampler, denoise, x, a, k))(x, arrays, key)
