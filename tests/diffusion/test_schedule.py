"""The noise schedule and the sampling plans against diffusers' schedulers.

References: ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler``, ``DDIMScheduler`` and
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``, built from SDXL's
published scheduler config; the img2img / refiner windows from
``StableDiffusionXLImg2ImgPipeline.get_timesteps`` and the base pipeline's ``denoising_end`` rule.

Tolerances: diffusers computes ``alphas_cumprod`` in float32 (a float32 cumprod of 1000 terms,
relative error ~1e-6) and its sigmas / timesteps from that, while ``NoiseSchedule`` works in
float64. Measured: sigmas agree to 1.3e-5 relative, integer timesteps exactly, fractional ones
(Euler linspace) to 3e-5 and Karras ones (fractional t from log-sigma interpolation, steepest near
t = 0 where sigma goes 0.029 -> 0.041 in one step) to 1.3e-3. The bounds below leave ~4x margin.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from sdxl_jax.diffusion.schedule import (
    SDXL_SCHEDULER_CONFIG,
    NoiseSchedule,
    karras_sigmas,
    sampler_steps,
)
from tests.cases import case
from tests.diffusion.schedulers import base_stop, img2img_window, make_scheduler

SIGMA_RTOL = 5e-5
T_ATOL = 1e-4
T_ATOL_KARRAS = 5e-3
SPACINGS = ("leading", "trailing", "linspace")
# (sampler, karras) for every combination sampler_steps() supports: each is a test case; the
# spacings, step counts and windows, on which the code branches less, are loops inside.
CONFIGS = [
    ("ddim", False),
    ("euler", False),
    ("euler", True),
    ("euler_a", False),
    ("dpmpp_2m", False),
    ("dpmpp_2m", True),
]
CONFIG_IDS = [f"{s}{'-karras' if k else ''}" for s, k in CONFIGS]
# 1 and 2: the edges of each spacing's formula; 7, 30, 999: T // steps and T / steps not whole;
# 1000: every timestep (leading DDIM then reaches t = 1000 and must refuse).
STEPS = (1, 2, 4, 7, 25, 30, 50, 999, 1000)
SCHEDULE = NoiseSchedule()


def reference_sigmas(sched, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """Noise level before and after each of the scheduler's steps, from the scheduler itself."""
    if sampler != "ddim":
        s = sched.sigmas.numpy().astype(np.float64)
        return s[:-1], s[1:]
    # DDIM steps from alpha_bar[t] to alpha_bar[t - T // steps], or final_alpha_cumprod below 0.
    ac = sched.alphas_cumprod.numpy().astype(np.float64)
    t = sched.timesteps.numpy().astype(np.int64)
    prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_next = np.where(prev >= 0, ac[np.maximum(prev, 0)], float(sched.final_alpha_cumprod))
    a = ac[t]
    return np.sqrt((1 - a) / a), np.sqrt((1 - a_next) / a_next)


def assert_plan_matches(
    p, sched, sampler: str, karras: bool, lo: int = 0, hi: int | None = None, sigma_atol=0.0
):
    """The plan equals the scheduler's steps lo:hi (timesteps, sigmas before/after each step).
    ``sigma_atol``: for linear betas, whose float32 1 - alpha_bar near t = 0 (beta = 1e-4) loses
    digits in diffusers: 6e-8 / 1e-4 relative, ~1e-6 absolute on sigma(0) = 0.01."""
    ref_t = sched.timesteps.numpy().astype(np.float64)[lo:hi]
    sigma, sigma_next = (s[lo:hi] for s in reference_sigmas(sched, sampler))
    assert p.sampler == sampler
    assert p.steps == len(ref_t) == len(p.sigma) == len(p.sigma_next) == len(p.order)
    t_atol = T_ATOL_KARRAS if (karras and sampler == "euler") else T_ATOL
    np.testing.assert_allclose(p.t, ref_t, rtol=0, atol=t_atol)
    np.testing.assert_allclose(p.sigma, sigma, rtol=SIGMA_RTOL, atol=sigma_atol)
    np.testing.assert_allclose(p.sigma_next, sigma_next, rtol=SIGMA_RTOL, atol=sigma_atol)


def dpm_orders(sched, timesteps) -> list[int]:
    """Which update (1st / 2nd order) diffusers' DPM-Solver++ makes at each step of timesteps."""
    orders = []
    first, second = (
        sched.dpm_solver_first_order_update,
        sched.multistep_dpm_solver_second_order_update,
    )

    def rec(fn, order):
        def wrapped(*a, **k):
            orders.append(order)
            return fn(*a, **k)

        return wrapped

    sched.dpm_solver_first_order_update = rec(first, 1)
    sched.multistep_dpm_solver_second_order_update = rec(second, 2)
    x = torch.zeros(1, 1, 1, 1)  # [B, C, H, W]: dynamic thresholding flattens C, H, W
    for t in timesteps:
        x = sched.step(torch.zeros(1, 1, 1, 1), t, x).prev_sample
    return orders


# --- the training schedule --------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_and_sigmas_match_diffusers(beta_schedule):
    sched = DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG, beta_schedule=beta_schedule)
    ours = NoiseSchedule(beta_schedule=beta_schedule)
    ref = sched.alphas_cumprod.numpy().astype(np.float64)
    assert ours.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(ours.alphas_cumprod, ref, rtol=5e-6, atol=0)
    np.testing.assert_allclose(ours.sigmas, np.sqrt((1 - ref) / ref), rtol=SIGMA_RTOL, atol=0)
    # Closed form at the ends: alpha_bar[0] = 1 - beta_start.
    assert ours.alphas_cumprod[0] == pytest.approx(1 - 0.00085, rel=1e-12)
    assert np.all(np.diff(ours.sigmas) > 0)


def test_t_at_matches_diffusers_sigma_to_t():
    log_sigmas = np.log(SCHEDULE.sigmas)
    rng = np.random.default_rng(0)
    sigmas = np.concatenate(
        [
            np.exp(rng.uniform(np.log(0.03), np.log(14.6), 200)),
            SCHEDULE.sigmas[[0, 1, 500, 998, 999]],  # on the grid, at both ends
            [1e-4, 0.01, 20.0, 100.0],  # outside the table: clamped to t = 0 / 999
        ]
    )
    ref = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)._sigma_to_t(sigmas, log_sigmas)
    np.testing.assert_allclose(SCHEDULE.t_at(sigmas), ref, rtol=0, atol=1e-9)
    # t_at inverts the table on the grid; sigma_at inverts t_at up to one interval's curvature.
    np.testing.assert_allclose(SCHEDULE.t_at(SCHEDULE.sigmas), np.arange(1000), atol=1e-9)
    t = np.array([0.0, 0.5, 17.25, 998.9])
    np.testing.assert_allclose(SCHEDULE.sigma_at(np.arange(1000)), SCHEDULE.sigmas, rtol=1e-15)
    np.testing.assert_allclose(SCHEDULE.t_at(SCHEDULE.sigma_at(t)), t, atol=0.05)


def test_karras_sigmas_closed_form():
    s = karras_sigmas(14.6, 0.03, 5)
    # Karras et al. 2022, eq. 5, evaluated by hand at i = 0, 2, 4.
    mid = ((14.6 ** (1 / 7) + 0.03 ** (1 / 7)) / 2) ** 7
    np.testing.assert_allclose(s[[0, 2, 4]], [14.6, mid, 0.03], rtol=1e-12)
    assert np.all(np.diff(s) < 0)


def test_schedule_from_scheduler_config(tmp_path):
    cfg = dict(make_scheduler("euler").config)
    assert NoiseSchedule.from_scheduler_config(cfg) == NoiseSchedule()
    v = NoiseSchedule.from_scheduler_config({**cfg, "prediction_type": "v_prediction"})
    assert v.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="trained_betas"):
        NoiseSchedule.from_scheduler_config({**cfg, "trained_betas": [0.1] * 1000})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(prediction_type="sample")
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule(timestep_spacing="karras")
    # From a checkpoint folder, and SDXL's defaults without one.
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**cfg, "timestep_spacing": "trailing"})
    )
    assert NoiseSchedule.from_checkpoint(tmp_path).timestep_spacing == "trailing"
    assert NoiseSchedule.from_checkpoint(tmp_path / "missing") == NoiseSchedule()


# --- full plans -------------------------------------------------------------------------------


def _plan_and_reference(sampler, karras, spacing, steps, **window):
    sched = make_scheduler(sampler, spacing, karras)
    sched.set_timesteps(steps)
    return sampler_steps(SCHEDULE, sampler, steps, spacing=spacing, karras=karras, **window), sched


@pytest.mark.parametrize(("sampler", "karras"), CONFIGS, ids=CONFIG_IDS)
def test_plan_matches_diffusers(sampler, karras):
    for spacing in SPACINGS:
        for steps in STEPS:
            with case(spacing=spacing, steps=steps):
                if (sampler, spacing, steps) == ("ddim", "leading", 1000):
                    # Leading spacing puts the last step at t = 999 + steps_offset = 1000, past
                    # the table: diffusers' DDIMScheduler.step fails there too.
                    with pytest.raises(ValueError, match="reach t = 1000"):
                        sampler_steps(SCHEDULE, sampler, steps, spacing=spacing)
                    continue
                p, sched = _plan_and_reference(sampler, karras, spacing, steps)
                assert_plan_matches(p, sched, sampler, karras)
                assert p.steps == steps
                assert p.init_scale == pytest.approx(float(sched.init_noise_sigma), rel=SIGMA_RTOL)
                assert p.vp == (sampler in ("ddim", "dpmpp_2m"))
                assert {k: v.dtype for k, v in p.arrays().items()} == {
                    "t": np.float32,
                    "sigma": np.float32,
                    "sigma_next": np.float32,
                    "order": np.int32,
                    "clip": np.float32,
                    "threshold": np.float32,
                }
                if sampler == "dpmpp_2m" and steps <= 50:  # diffusers' step fails at 1000
                    assert p.order.tolist() == dpm_orders(sched, sched.timesteps)


def test_plan_spacing_defaults_to_the_schedule():
    trailing = NoiseSchedule(timestep_spacing="trailing")
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        got = sampler_steps(trailing, sampler, 10)
        want = sampler_steps(SCHEDULE, sampler, 10, spacing="trailing")
        np.testing.assert_array_equal(got.t, want.t)
        np.testing.assert_array_equal(got.sigma, want.sigma)


# --- windows: img2img strength, base denoising_end, refiner denoising_start --------------------


@pytest.mark.parametrize(("sampler", "karras"), CONFIGS, ids=CONFIG_IDS)
def test_strength_window_matches_img2img(sampler, karras):
    for spacing in SPACINGS:
        for steps in (4, 25, 30):
            # 0.99: int(steps * strength) rounds down to steps - 1; 1.0 keeps every step.
            for strength in (0.3, 0.75, 0.99, 1.0):
                with case(spacing=spacing, steps=steps, strength=strength):
                    p, sched = _plan_and_reference(
                        sampler, karras, spacing, steps, strength=strength
                    )
                    start, n = img2img_window(sched, steps, strength)
                    # The rule, independently: the last int(steps * strength) steps.
                    assert n == min(int(steps * strength), steps)
                    assert_plan_matches(p, sched, sampler, karras, lo=start)
                    if sampler == "dpmpp_2m":
                        assert p.order.tolist() == dpm_orders(sched, sched.timesteps[start:])


def _check_base_and_refiner_windows(sampler, karras, spacing, steps, frac):
    kw = dict(spacing=spacing, karras=karras)
    base = make_scheduler(sampler, spacing, karras)
    base.set_timesteps(steps)
    stop = base_stop(base, frac)
    refiner = make_scheduler(sampler, spacing, karras)
    refiner.set_timesteps(steps)
    start, n = img2img_window(refiner, steps, denoising_start=frac)

    if stop > 0:
        p_base = sampler_steps(SCHEDULE, sampler, steps, denoising_end=frac, **kw)
        assert_plan_matches(p_base, base, sampler, karras, hi=stop)
        assert p_base.init_scale == pytest.approx(float(base.init_noise_sigma), rel=SIGMA_RTOL)
        if sampler == "dpmpp_2m":
            assert p_base.order.tolist() == dpm_orders(base, base.timesteps[:stop])
    else:
        with pytest.raises(ValueError, match="no steps left"):
            sampler_steps(SCHEDULE, sampler, steps, denoising_end=frac, **kw)
    if n > 0:
        p_ref = sampler_steps(SCHEDULE, sampler, steps, denoising_start=frac, **kw)
        assert_plan_matches(p_ref, refiner, sampler, karras, lo=start)
        if sampler == "dpmpp_2m":  # a fresh solver: first order again at the hand-off
            assert p_ref.order.tolist() == dpm_orders(refiner, refiner.timesteps[start:])
    else:  # e.g. 4 trailing steps end at t = 249 >= the cutoff 200 of frac = 0.8
        with pytest.raises(ValueError, match="no steps left"):
            sampler_steps(SCHEDULE, sampler, steps, denoising_start=frac, **kw)
    # The two windows split the schedule (the refiner's start is the base's stop).
    assert start == stop


@pytest.mark.parametrize(("sampler", "karras"), CONFIGS, ids=CONFIG_IDS)
def test_base_refiner_windows_match_diffusers(sampler, karras):
    for spacing in SPACINGS:
        for steps in (4, 25, 30, 50):
            for frac in (0.8, 0.7, 0.55):
                with case(spacing=spacing, steps=steps, frac=frac):
                    _check_base_and_refiner_windows(sampler, karras, spacing, steps, frac)


def test_denoising_start_overrides_strength():
    a = sampler_steps(SCHEDULE, "euler", 30, denoising_start=0.8, strength=0.3)
    b = sampler_steps(SCHEDULE, "euler", 30, denoising_start=0.8)
    np.testing.assert_array_equal(a.t, b.t)


# --- start states -----------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "karras"), CONFIGS, ids=CONFIG_IDS)
def test_noised_matches_add_noise(sampler, karras):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    for spacing in SPACINGS:
        for strength in (0.35, 0.8, 1.0):
            with case(spacing=spacing, strength=strength):
                p, sched = _plan_and_reference(sampler, karras, spacing, 25, strength=strength)
                start, _ = img2img_window(sched, 25, strength)  # set_begin_index(start)
                ref = sched.add_noise(x0, noise, sched.timesteps[start : start + 1].repeat(2))
                got = p.noised(x0.numpy(), noise.numpy())
                atol = 2e-5 * max(1.0, float(p.sigma[0]))
                np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=atol)


def test_noised_closed_form():
    x0 = np.array([0.5, -1.0])
    noise = np.array([1.0, 2.0])
    p = sampler_steps(SCHEDULE, "ddim", 10, strength=0.5)
    a = SCHEDULE.alphas_cumprod[int(p.t[0])]
    np.testing.assert_allclose(p.noised(x0, noise), np.sqrt(a) * x0 + np.sqrt(1 - a) * noise)
    p = sampler_steps(SCHEDULE, "euler", 10, strength=0.5)
    np.testing.assert_allclose(p.noised(x0, noise), x0 + p.sigma[0] * noise)


# --- errors -----------------------------------------------------------------------------------


def test_plan_errors():
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_steps(SCHEDULE, "heun", 10)
    for sampler in ("ddim", "euler_a"):
        with pytest.raises(ValueError, match="Karras"):
            sampler_steps(SCHEDULE, sampler, 10, karras=True)
    with pytest.raises(ValueError, match="timestep spacing"):
        sampler_steps(SCHEDULE, "euler", 10, spacing="karras")
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            sampler_steps(SCHEDULE, "euler", steps)
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength"):
            sampler_steps(SCHEDULE, "euler", 10, strength=strength)
    for key in ("denoising_start", "denoising_end"):
        for v in (0.0, 1.0, 1.2):
            with pytest.raises(ValueError, match=key):
                sampler_steps(SCHEDULE, "euler", 10, **{key: v})
    # int(4 * 0.2) == 0 steps: img2img would do nothing.
    with pytest.raises(ValueError, match="no steps left"):
        sampler_steps(SCHEDULE, "euler", 4, strength=0.2)
    # Leading spacing ends at t = 1: nothing below the cutoff round(1000 - 0.9995 * 1000) = 0.
    with pytest.raises(ValueError, match="no steps left"):
        sampler_steps(SCHEDULE, "dpmpp_2m", 10, denoising_start=0.9995)
    # The first of 10 leading steps is t = 901 < round(1000 - 0.05 * 1000) = 950.
    with pytest.raises(ValueError, match="no steps left"):
        sampler_steps(SCHEDULE, "ddim", 10, denoising_end=0.05)
    with pytest.raises(ValueError, match="no steps left"):
        sampler_steps(SCHEDULE, "euler", 10, denoising_start=0.8, denoising_end=0.5)


def test_plan_is_frozen():
    p = sampler_steps(SCHEDULE, "euler", 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sampler = "ddim"
