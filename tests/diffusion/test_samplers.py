"""The samplers and the denoiser wrapper.

1. Closed form. For data x0 ~ N(mu, s^2) (i.i.d. per coordinate) the exact denoiser at noise level
   sigma is E[x0 | x0 + sigma n = y] = mu + g (y - mu), g = s^2 / (s^2 + sigma^2). Every update is
   then affine in z = y - mu (y the variance-exploding state), so each sampler's final mean and
   variance follow from a scalar float64 recursion written here from the papers' update rules, and
   the exact probability-flow ODE / reverse SDE gives the continuous-time answer.
2. Step-for-step parity with diffusers' schedulers, driving both with the same analytic epsilon
   predictor (the Gaussian one above, written as a function of (x_vp, t) like a UNet).
3. ``denoiser.denoiser`` (epsilon / v prediction) and ``denoiser.guided`` against closed forms.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from sdxl_jax.diffusion import denoiser as dn
from sdxl_jax.diffusion import samplers
from sdxl_jax.diffusion.schedule import NoiseSchedule, sampler_steps
from tests.cases import case
from tests.diffusion.schedulers import img2img_window, make_scheduler

SCHEDULE = NoiseSchedule()
# SDXL's sigma table in float64, from the closed form (scaled_linear betas), not from the code.
_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
_ABAR = np.cumprod(1.0 - _BETAS)
REF_SIGMAS = np.sqrt((1.0 - _ABAR) / _ABAR)
REF_LOG_SIGMAS = np.log(REF_SIGMAS)


# --- 1. closed form: Gaussian data ------------------------------------------------------------


@functools.cache  # one function per (mu, s), so that compiled() can reuse its programs
def gaussian_denoiser(mu: float, s: float):
    """The exact (x0, eps) for x0 ~ N(mu, s^2), from the VP state and its VE noise level."""

    def denoise(x_vp, t, sigma):
        y = x_vp * jnp.sqrt(1.0 + sigma * sigma)
        x0 = mu + s * s / (s * s + sigma * sigma) * (y - mu)
        return x0, (y - x0) / sigma

    return denoise


def init_std_ve(p) -> float:
    """Std of the start state (init_scale * N(0, 1)) in VE units (y = x_vp * sqrt(1 + sigma^2))."""
    return p.init_scale * (math.sqrt(1.0 + p.sigma[0] ** 2) if p.vp else 1.0)


def final_vp_scale(p) -> float:
    """The final state is x_vp = y / sqrt(1 + sigma_end^2) for the VP samplers (DDIM stops at
    alpha_bar[0], sigma_end ~ 0.029; DPM-Solver++ at sigma = 0), y itself for Euler."""
    return 1.0 / math.sqrt(1.0 + p.sigma_next[-1] ** 2) if p.vp else 1.0


def reference_moments(p, mu: float, s: float) -> tuple[float, float, float]:
    """(a, b, noise_var): the sampler of plan ``p`` on N(mu, s^2) data maps its start state x to
    b + a * x + N(0, noise_var), exactly; float64.

    In VE terms (y = x_vp * sqrt(1 + sigma^2) for the VP samplers, y = x for Euler), with
    D = mu + g (y - mu), g = s^2 / (s^2 + sigma^2), and r = sigma' / sigma:
      DDIM (eta 0): y' = D + sigma' eps = D + r (y - D)
      Euler:        y' = y + (y - D) / sigma * (sigma' - sigma) = the same
      Euler a.:     Euler to sigma_down, then + sigma_up N(0, 1), with sigma_up^2 =
                    sigma'^2 (sigma^2 - sigma'^2) / sigma^2, sigma_down^2 = sigma'^2 - sigma_up^2
      DPM++(2M):    y' = r y + (1 - r) D_eff, D_eff = D at first order (the first step and the
                    step onto sigma = 0), else D + (D - D_prev) / (2 r0), r0 = h_prev / h, h the
                    step in -log sigma (Lu et al. 2022, Alg. 2, in VE form).
    DDIM's state after a step is at sigma', which with linspace/trailing spacing is not the next
    step's sigma (diffusers steps to t - T // steps): the recursion keeps the VP state as such.
    """
    one = np.array([0.0, 1.0])  # affine functions of the start state: (coefficient, constant)
    x, noise_var, d_prev = np.array([1.0, 0.0]), 0.0, one * 0
    for i, (sg, sn) in enumerate(zip(p.sigma, p.sigma_next, strict=True)):
        y = x * math.sqrt(1 + sg * sg) if p.vp else x
        g = s * s / (s * s + sg * sg)
        d = mu * one + g * (y - mu * one)
        if p.sampler in ("ddim", "euler"):
            y = d + sn / sg * (y - d)
        elif p.sampler == "euler_a":
            up = sn * math.sqrt(sg * sg - sn * sn) / sg
            down = math.sqrt(sn * sn - up * up)
            f = g + (1 - g) * down / sg  # d(y')/dy
            y = d + down / sg * (y - d)
            noise_var = noise_var * f * f + up * up
        else:
            r = sn / sg
            d_eff = d
            if i > 0 and sn > 0:
                r0 = math.log(p.sigma[i - 1] / sg) / math.log(sg / sn)
                d_eff = d + (d - d_prev) / (2 * r0)
            y, d_prev = r * y + (1 - r) * d_eff, d
        x = y / math.sqrt(1 + sn * sn) if p.vp else y
    return float(x[0]), float(x[1]), noise_var


def continuum_moments(p, mu: float, s: float) -> tuple[float, float]:
    """Mean and std of the final state under the exact dynamics from the plan's start state.

    Probability-flow ODE: z(sigma) = z(sigma_max) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)).
    Reverse SDE (ancestral): the mean deviation contracts by (s^2 + sigma^2) / (s^2 + sigma_max^2)
    and the variance is (s^2 + sigma^2) + a^2 (var_start - (s^2 + sigma_max^2)).
    """
    s_max, s_end = p.sigma[0], p.sigma_next[-1]
    var0 = init_std_ve(p) ** 2
    if p.sampler == "euler_a":
        a = (s * s + s_end**2) / (s * s + s_max**2)
        var = s * s + s_end**2 + a * a * (var0 - s * s - s_max**2)
    else:
        a = math.sqrt((s * s + s_end**2) / (s * s + s_max**2))
        var = a * a * var0
    k = final_vp_scale(p)
    return k * mu * (1 - a), k * math.sqrt(var)  # the start state has mean 0


@functools.cache
def compiled(sampler: str, denoise):
    """samplers.run_steps without a fresh trace per call: the program is reused for every plan
    of the same length (spacings, windows), which keeps this file's compile time down."""
    return jax.jit(lambda x, arrays, key: samplers.sample(sampler, denoise, x, arrays, key))


def run(denoise, x, p, key=None) -> np.ndarray:
    arrays = {k: jnp.asarray(v) for k, v in p.arrays().items()}
    return np.asarray(compiled(p.sampler, denoise)(jnp.asarray(x), arrays, key), np.float64)


def run_gaussian(p, mu, s, x, key=None):
    return run(gaussian_denoiser(mu, s), x, p, key)


N_SAMPLES = 200_000
GAUSSIANS = [(0.5, 0.3), (-1.0, 1.5)]
# (sampler, karras, steps)
SAMPLE_CONFIGS = [
    ("ddim", False, 50),
    ("euler", False, 50),
    ("euler", True, 50),
    ("euler_a", False, 100),
    ("dpmpp_2m", False, 50),
    ("dpmpp_2m", True, 50),
]
SAMPLE_IDS = [f"{a}{'-karras' if k else ''}-{n}" for a, k, n in SAMPLE_CONFIGS]
# The deterministic (sampler, karras) combinations; each is one test case below, the spacings,
# step counts and windows loops inside it.
DETERMINISTIC = [(a, k) for a, k, _ in SAMPLE_CONFIGS if a != "euler_a"]
DETERMINISTIC_IDS = [f"{a}{'-karras' if k else ''}" for a, k in DETERMINISTIC]


def spacings(sampler: str, karras: bool) -> tuple[str, ...]:
    """The spacings that give distinct plans: DPM's Karras sigmas ignore the spacing."""
    if sampler == "dpmpp_2m" and karras:
        return ("leading",)
    return ("leading", "trailing", "linspace")


# Discretization error of the exact discrete samplers (reference_moments) against the continuum
# (continuum_moments), computed in float64 for these plans: relative std error, and mean error in
# units of s. It is dominated by the last step, sigma_last -> 0 (-> 0.029 for DDIM), a step of
# infinite log-SNR, exact only when sigma_last << s: on the leading grid sigma_last is
# sigma(t=21) = 0.14 at 50 steps (DPM++: sigma(t=20)), so s = 0.3 is the hard case.
#   s = 0.3: ddim -7.8% / 0.3%, euler -8.5% / 0.3%, euler karras -4.2% / 0.2%,
#            euler_a -9.9% / 0.0%, dpm++ -8.9% / 0.4%, dpm++ karras -0.24% / 0.01%
#   s = 1.5: ddim -2.2% / 0.2%, euler -2.2% / 0.2%, euler karras -2.7% / 0.2%,
#            euler_a -2.4% / 0.0%, dpm++ -0.33% / 0.03%, dpm++ karras +0.14% / 0.01%
# Bounds, ~25% over the worst case:
DISC_STD_RTOL = {0.3: 0.12, 1.5: 0.035}
DISC_MEAN_ATOL = 0.006  # in units of s


@pytest.mark.parametrize(("sampler", "karras", "steps"), SAMPLE_CONFIGS, ids=SAMPLE_IDS)
def test_gaussian_data_moments(sampler, karras, steps):
    """Sample 200k coordinates from pure noise for each of GAUSSIANS; compare the empirical
    mean/std with the exact discrete sampler's (tight: statistical error only) and with the
    exact continuous-time dynamics (loose: plus the discretization error above).

    Statistical error: std/sqrt(N) for the mean, std/sqrt(2N) for the std: 0.22% / 0.16% of the
    std at N = 200k; we allow 5 sigma (1.1% / 0.8%); float32 rounding is ~1e-6. Checked by
    mutation to fail on: a sign flip in the Euler step, no 1/sqrt(1 + sigma^2) on Euler's model
    input, DDIM without its VP rescaling, Euler ancestral with sigma_up 10% small, with
    sigma_down = sigma' or with the same noise at every step, DPM++ without, with a doubled or
    with an inverted-ratio second-order term, DPM++ without the VP state rescaling.
    """
    p = sampler_steps(SCHEDULE, sampler, steps, karras=karras)
    x = p.init_scale * jax.random.normal(jax.random.key(0), (N_SAMPLES, 1, 1, 1), jnp.float32)
    key = jax.random.key(1) if sampler == "euler_a" else None
    for mu, s in GAUSSIANS:
        with case(mu=mu, s=s):
            _check_moments(p, mu, s, run_gaussian(p, mu, s, x, key))


def _check_moments(p, mu: float, s: float, out: np.ndarray) -> None:
    assert np.isfinite(out).all()
    mean, std = out.mean(), out.std()

    a, b, noise_var = reference_moments(p, mu, s)
    ref_mean, ref_std = b, math.sqrt(a * a * p.init_scale**2 + noise_var)
    n = out.size
    assert abs(mean - ref_mean) <= 5 * ref_std / math.sqrt(n), (mean, ref_mean)
    assert abs(std - ref_std) <= 5 * ref_std / math.sqrt(2 * n), (std, ref_std)

    # The continuum: the ODE / SDE started from the plan's start law (not quite the marginal at
    # sigma_max: init_scale is sqrt(sigma_max^2 + 1), not sqrt(sigma_max^2 + s^2)).
    c_mean, c_std = continuum_moments(p, mu, s)
    assert abs(ref_mean - c_mean) <= DISC_MEAN_ATOL * s
    assert abs(ref_std / c_std - 1) <= DISC_STD_RTOL[s]
    stat = 5 * c_std / math.sqrt(n)
    assert abs(mean - c_mean) <= DISC_MEAN_ATOL * s + stat
    assert abs(std / c_std - 1) <= DISC_STD_RTOL[s] + stat / c_std


def test_ddim_ends_at_alpha_bar_0():
    """DDIM with set_alpha_to_one=False stops at sigma_min = sigma(t=0) ~ 0.029, not at 0: for
    narrow data (s = 0.02 < sigma_min) the final std is sqrt(s^2 + sigma_min^2) / sqrt(1 +
    sigma_min^2) ~ 0.035, 75% above s."""
    mu, s = 0.25, 0.02
    p = sampler_steps(SCHEDULE, "ddim", 50)
    sigma_min = REF_SIGMAS[0]
    assert p.sigma_next[-1] == pytest.approx(sigma_min, rel=1e-6)
    x = jnp.asarray([0.0, 1.0], jnp.float32)
    out = run_gaussian(p, mu, s, x)
    a, b, _ = reference_moments(p, mu, s)
    np.testing.assert_allclose(out, b + a * np.array([0.0, 1.0]), rtol=1e-5, atol=1e-6)
    # The affine map's slope, times the start std (1), is the final std; ODE from sigma_max:
    expected_std = math.sqrt((s * s + sigma_min**2) / (s * s + p.sigma[0] ** 2))
    expected_std *= math.sqrt(1 + p.sigma[0] ** 2) / math.sqrt(1 + sigma_min**2)
    # (the discrete map is 6% below it: DDIM's first-order error at 50 steps)
    assert out[1] - out[0] == pytest.approx(expected_std, rel=0.1)
    assert out[1] - out[0] > 1.6 * s


@pytest.mark.parametrize(("sampler", "karras"), DETERMINISTIC, ids=DETERMINISTIC_IDS)
def test_deterministic_samplers_exact_affine_map(sampler, karras):
    """Deterministic samplers on Gaussian data are affine maps of the start state, b + a * x:
    compared with the float64 recursion at float32 precision (no sampling noise), which also
    catches errors too small for the moment test, e.g. a missing final 1/sqrt(1 + sigma_min^2)
    in DDIM (4e-4 relative), and covers DDIM's off-grid steps (linspace / trailing)."""
    mu, s = -0.7, 0.6
    for spacing in spacings(sampler, karras):
        for steps in (1, 10, 37):
            with case(spacing=spacing, steps=steps):
                p = sampler_steps(SCHEDULE, sampler, steps, spacing=spacing, karras=karras)
                x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0], np.float32) * np.float32(p.init_scale)
                out = run_gaussian(p, mu, s, jnp.asarray(x))
                a, b, noise_var = reference_moments(p, mu, s)
                assert noise_var == 0
                np.testing.assert_allclose(out, b + a * x.astype(np.float64), rtol=2e-5, atol=2e-5)


def _ode_error(p, mu, s) -> float:
    """Max error against the exact probability-flow ODE, start states across +-3 init_scale."""
    x = np.linspace(-3, 3, 7) * p.init_scale
    out = run_gaussian(p, mu, s, jnp.asarray(x, jnp.float32))
    vin = math.sqrt(1.0 + p.sigma[0] ** 2) if p.vp else 1.0
    s_end = p.sigma_next[-1]
    a = math.sqrt((s * s + s_end**2) / (s * s + p.sigma[0] ** 2))
    exact = final_vp_scale(p) * (mu + a * (vin * x - mu))
    return float(np.abs(out - exact).max())


@pytest.mark.parametrize(("sampler", "karras"), DETERMINISTIC, ids=DETERMINISTIC_IDS)
def test_deterministic_samplers_converge(sampler, karras):
    """Error against the exact ODE map shrinks with the number of steps. Measured 10 -> 100
    steps: 6-9x for the first-order samplers (and for DPM++ on the leading grid, whose last
    step sigma(t=10) -> 0 is first order), 280x for DPM++ with Karras sigmas at s = 1.5."""
    p10 = sampler_steps(SCHEDULE, sampler, 10, karras=karras)
    p100 = sampler_steps(SCHEDULE, sampler, 100, karras=karras)
    for mu, s in GAUSSIANS:
        e10, e100 = _ode_error(p10, mu, s), _ode_error(p100, mu, s)
        assert e100 < e10 / 4, (mu, s, e10, e100)
        if sampler == "dpmpp_2m" and karras and s == 1.5:
            # Second order: first-order DPM++ on the same grid gains only ~10x.
            assert e100 < e10 / 50, (mu, s, e10, e100)


def test_euler_ancestral_needs_a_key_and_uses_it():
    p = sampler_steps(SCHEDULE, "euler_a", 10)
    x = p.init_scale * jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
    denoise = gaussian_denoiser(0.0, 1.0)
    with pytest.raises(ValueError, match="key"):
        samplers.run_steps(denoise, x, p)
    run = jax.jit(lambda x, a, k: samplers.sample("euler_a", denoise, x, a, k))
    arrays = {k: jnp.asarray(v) for k, v in p.arrays().items()}
    a, b, c = (np.asarray(run(x, arrays, jax.random.key(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


# --- 2. parity with diffusers -----------------------------------------------------------------

# Per-channel Gaussian data (NHWC, C = 4): the schedulers are elementwise, so the layout is moot.
MU = np.array([0.5, -1.0, 0.2, 1.0], np.float32)
STD = np.array([0.3, 1.5, 0.8, 0.5], np.float32)
SHAPE = (2, 8, 8, 4)
PARITY_ATOL = 1e-4


def _sigma_of_t_np(t: float) -> float:
    """Sigma at a (fractional) timestep, log-linear between table entries (inverts t_at)."""
    lo = min(max(int(math.floor(t)), 0), 998)
    w = t - lo
    return math.exp((1 - w) * REF_LOG_SIGMAS[lo] + w * REF_LOG_SIGMAS[lo + 1])


def torch_eps_model(x_vp: torch.Tensor, t) -> torch.Tensor:
    """The exact epsilon predictor for N(MU, STD^2) data, as a function of (x_vp, t)."""
    sigma = _sigma_of_t_np(float(t))
    mu, s = torch.from_numpy(MU), torch.from_numpy(STD)
    y = x_vp * math.sqrt(1 + sigma * sigma)
    return (sigma * (y - mu) / (s * s + sigma * sigma)).to(torch.float32)


_LOG_SIGMAS_F32 = jnp.asarray(REF_LOG_SIGMAS, jnp.float32)


def jax_eps_model(x_vp: jax.Array, t: jax.Array) -> jax.Array:
    """The same predictor in JAX (t traced, float32)."""
    lo = jnp.clip(jnp.floor(t), 0, 998)
    w = t - lo
    lo = lo.astype(jnp.int32)
    sigma = jnp.exp((1 - w) * _LOG_SIGMAS_F32[lo] + w * _LOG_SIGMAS_F32[lo + 1])
    y = x_vp * jnp.sqrt(1 + sigma * sigma)
    return sigma * (y - MU) / (STD * STD + sigma * sigma)


def diffusers_loop(sched, x: torch.Tensor, timesteps) -> torch.Tensor:
    """diffusers' denoising loop (pipeline order: scale_model_input, model, step)."""
    for t in timesteps:
        eps = torch_eps_model(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x).prev_sample
    return x


EPS_DENOISER = dn.denoiser(jax_eps_model)


def ours(p, x: np.ndarray, key=None) -> np.ndarray:
    return run(EPS_DENOISER, x, p, key).astype(np.float32)


def start_noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def assert_parity(got: np.ndarray, ref: torch.Tensor):
    ref = ref.numpy()
    assert got.shape == ref.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize(("sampler", "karras"), DETERMINISTIC, ids=DETERMINISTIC_IDS)
def test_parity_with_diffusers(sampler, karras):
    x = start_noise()
    for spacing in spacings(sampler, karras):
        for steps in (4, 25):
            with case(spacing=spacing, steps=steps):
                sched = make_scheduler(sampler, spacing, karras)
                sched.set_timesteps(steps)
                x_ref = torch.from_numpy(x) * sched.init_noise_sigma
                ref = diffusers_loop(sched, x_ref, sched.timesteps)
                p = sampler_steps(SCHEDULE, sampler, steps, spacing=spacing, karras=karras)
                assert_parity(ours(p, x * np.float32(p.init_scale)), ref)


def test_parity_with_diffusers_many_steps():
    x = start_noise(1)
    for sampler, karras in [("euler", True), ("dpmpp_2m", False), ("ddim", False)]:
        sched = make_scheduler(sampler, "leading", karras)
        sched.set_timesteps(50)
        ref = diffusers_loop(sched, torch.from_numpy(x) * sched.init_noise_sigma, sched.timesteps)
        p = sampler_steps(SCHEDULE, sampler, 50, karras=karras)
        assert_parity(ours(p, x * np.float32(p.init_scale)), ref)


def test_euler_ancestral_parity_with_diffusers(monkeypatch):
    """Euler ancestral against diffusers, fed the noise our sampler draws at step i
    (``normal(fold_in(key, i))``: an implementation detail of samplers.euler_ancestral, restated
    here so that the sigma_up / sigma_down arithmetic is compared exactly)."""
    steps, key = 20, jax.random.key(7)
    x = start_noise(2)
    noise = jax.jit(lambda i: jax.random.normal(jax.random.fold_in(key, i), SHAPE))
    for spacing in ("leading", "trailing"):  # init_noise_sigma differs (sqrt(s^2 + 1) / s)
        with case(spacing=spacing):
            draws = (torch.tensor(np.asarray(noise(i))) for i in range(steps))
            monkeypatch.setattr(
                scheduling_euler_ancestral_discrete,
                "randn_tensor",
                lambda *a, d=draws, **k: next(d),
            )
            sched = make_scheduler("euler_a", spacing)
            sched.set_timesteps(steps)
            x_ref = torch.from_numpy(x) * sched.init_noise_sigma
            ref = diffusers_loop(sched, x_ref, sched.timesteps)
            p = sampler_steps(SCHEDULE, "euler_a", steps, spacing=spacing)
            assert_parity(ours(p, x * np.float32(p.init_scale), key), ref)


@pytest.mark.parametrize(("sampler", "karras"), DETERMINISTIC, ids=DETERMINISTIC_IDS)
def test_base_refiner_handoff_parity(sampler, karras):
    """Base run to denoising_end, its state handed to a fresh scheduler from denoising_start
    (as StableDiffusionXLPipeline -> StableDiffusionXLImg2ImgPipeline with output_type="latent":
    the refiner adds no noise), against the same with two diffusers scheduler instances."""
    for spacing, frac in (("leading", 0.8), ("trailing", 0.7)):
        with case(spacing=spacing, frac=frac):
            _check_handoff(sampler, karras, spacing, frac)


def _check_handoff(sampler, karras, spacing, frac):
    steps = 25
    x = start_noise(3)
    base = make_scheduler(sampler, spacing, karras)
    base.set_timesteps(steps)
    cutoff = int(round(1000 - frac * 1000))
    base_ts = [t for t in base.timesteps if t >= cutoff]
    ref_mid = diffusers_loop(base, torch.from_numpy(x) * base.init_noise_sigma, base_ts)
    refiner = make_scheduler(sampler, spacing, karras)
    refiner.set_timesteps(steps)
    start, _ = img2img_window(refiner, steps, denoising_start=frac)
    ref = diffusers_loop(refiner, ref_mid.clone(), refiner.timesteps[start:])

    kw = dict(spacing=spacing, karras=karras)
    p_base = sampler_steps(SCHEDULE, sampler, steps, denoising_end=frac, **kw)
    p_ref = sampler_steps(SCHEDULE, sampler, steps, denoising_start=frac, **kw)
    assert p_base.steps == len(base_ts) and p_ref.steps == steps - start
    mid = ours(p_base, x * np.float32(p_base.init_scale))
    assert_parity(mid, ref_mid)
    assert_parity(ours(p_ref, mid), ref)


@pytest.mark.parametrize(("sampler", "karras"), DETERMINISTIC, ids=DETERMINISTIC_IDS)
def test_img2img_parity(sampler, karras):
    """img2img: noise clean latents to the window's first level, then sample, both ways."""
    steps = 20
    x0 = start_noise(4) * 0.5
    noise = start_noise(5)
    for strength in (0.3, 0.65):
        with case(strength=strength):
            sched = make_scheduler(sampler, "leading", karras)
            sched.set_timesteps(steps)
            start, _ = img2img_window(sched, steps, strength)
            ts = sched.timesteps[start:]
            t0 = ts[:1].repeat(SHAPE[0])
            x_ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t0)
            ref = diffusers_loop(sched, x_ref, ts)
            p = sampler_steps(SCHEDULE, sampler, steps, karras=karras, strength=strength)
            start_state = p.noised(x0, noise).astype(np.float32)
            assert_parity(ours(p, start_state), ref)


# --- 3. the denoiser wrapper and guidance -----------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_recovers_x0_and_eps(prediction_type):
    """x_vp = a x0 + s eps (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)); epsilon models predict
    eps, v models v = a eps - s x0 (Salimans & Ho 2022). Both must give back (x0, eps)."""
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    for t in (1, 250, 999):
        ab = _ABAR[t]
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        x_vp = (a * x0 + s * eps).astype(np.float32)
        target = eps if prediction_type == "epsilon" else (a * eps - s * x0).astype(np.float32)
        model = lambda x, tt, target=target: jnp.asarray(target)
        denoise = dn.denoiser(model, prediction_type)
        sigma = jnp.float32(REF_SIGMAS[t])
        got_x0, got_eps = jax.jit(denoise)(jnp.asarray(x_vp), jnp.float32(t), sigma)
        # eps -> x0 divides by a (1/a = 14.6 at t = 999): float32 error scales with it.
        np.testing.assert_allclose(np.asarray(got_x0), x0, rtol=0, atol=3e-6 / a)
        np.testing.assert_allclose(np.asarray(got_eps), eps, rtol=0, atol=3e-6 / min(a, s))


def test_denoiser_passes_state_and_timestep():
    seen = {}

    def model(x, t):
        seen["x"], seen["t"] = x, t
        return jnp.zeros_like(x)

    x = jnp.full((1, 2, 2, 4), 0.5)
    x0, eps = dn.denoiser(model)(x, jnp.float32(500.0), jnp.float32(3.0))
    assert seen["x"] is x and float(seen["t"]) == 500.0
    np.testing.assert_allclose(np.asarray(x0), 0.5 * math.sqrt(10.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(eps), 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        dn.denoiser(model, "sample")


def _cond_model(x, t, cond):
    """Nonlinear in x, t and both conditioning leaves (a pytree with a leading batch axis)."""
    h = jnp.tanh(x * cond["scale"][:, None, None, :] + cond["shift"][:, None, None, :])
    return h * jnp.cos(t / 300.0) + 0.1 * x * x


def test_guided_is_uncond_plus_scaled_difference():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    t = jnp.float32(421.0)

    def leaves(seed):
        r = np.random.default_rng(seed)
        return {
            "scale": jnp.asarray(r.standard_normal((SHAPE[0], 4)), jnp.float32),
            "shift": jnp.asarray(r.standard_normal((SHAPE[0], 4)), jnp.float32),
        }

    cond, uncond = leaves(10), leaves(11)
    batches = []

    def model(x, t, c):
        batches.append(x.shape[0])
        return _cond_model(x, t, c)

    u, c = _cond_model(x, t, uncond), _cond_model(x, t, cond)
    for scale in (1.0, 5.0, 7.5):
        batches.clear()
        got = jax.jit(dn.guided(model, cond, uncond, scale))(x, t)
        assert batches == [2 * SHAPE[0]]  # one batched call
        want = u + scale * (c - u)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=scale)
        if scale == 1.0:  # the conditional prediction alone
            np.testing.assert_allclose(np.asarray(got), np.asarray(c), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(dn.conditional(_cond_model, cond)(x, t)), np.asarray(c), atol=1e-6
    )


def test_guided_denoiser_in_a_sampler():
    """Guidance composes with the denoiser and a sampler: a guided model whose uncond/cond halves
    are Gaussian predictors for means m_u, m_c is, for epsilon, the predictor of the data mean
    m_u + w (m_c - m_u) (eps is affine in the mean), so euler lands on that mean."""
    s, w = 0.5, 3.0

    def model(x_vp, t, m):
        sigma = jnp.exp(jnp.interp(t, jnp.arange(1000.0), _LOG_SIGMAS_F32))
        y = x_vp * jnp.sqrt(1 + sigma * sigma)
        return sigma * (y - m[:, None, None, None]) / (s * s + sigma * sigma)

    m_u, m_c = jnp.zeros(4), jnp.full(4, 0.2)
    p = sampler_steps(SCHEDULE, "euler", 30)  # integer timesteps: sigma(t) is the steps'
    x = p.init_scale * jax.random.normal(jax.random.key(3), (4, 64, 64, 1))
    out = samplers.run_steps(dn.denoiser(dn.guided(model, m_c, m_u, w)), x, p)
    a, b, _ = reference_moments(p, 0.2 * w, s)
    np.testing.assert_allclose(np.asarray(out), b + a * np.asarray(x), atol=1e-4)
