"""Scheduler configs other than SDXL's published one, against diffusers' ``from_config``.

diffusers builds a sampler's scheduler with ``SchedulerClass.from_config(config)``: a setting the
config lacks takes *that class's* default. An ``EulerDiscreteScheduler()`` saved from code has no
``clip_sample`` / ``set_alpha_to_one``, so DDIM gets its defaults (True, True), not SDXL's
(False, False). Checked here: the settings each sampler resolves (and that they cover every
``__init__`` argument of its class), the plans and the sampled results (exact Gaussian denoiser)
for configs that omit keys or set clip_sample, thresholding, set_alpha_to_one, final sigmas,
Karras ranges, solver order..., the one-line refusals, and ``python -m sdxl_jax.sample`` on a
tiny pipeline whose scheduler was saved from ``EulerDiscreteScheduler()``.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

from sdxl_jax import sample
from sdxl_jax.diffusion.schedule import (
    SAMPLERS,
    SDXL_SCHEDULER_CONFIG,
    NoiseSchedule,
    sampler_steps,
)
from sdxl_jax.diffusion.scheduler_config import CLASS_DEFAULTS, COMMON_DEFAULTS
from tests.cases import case
from tests.diffusion.schedulers import SCHEDULERS, make_scheduler
from tests.diffusion.test_samplers import (
    PARITY_ATOL,
    assert_parity,
    diffusers_loop,
    ours,
    start_noise,
)
from tests.diffusion.test_schedule import assert_plan_matches, dpm_orders


def saved(scheduler) -> dict:
    """The scheduler_config.json ``save_config`` writes (what a checkpoint folder holds)."""
    with tempfile.TemporaryDirectory() as d:
        scheduler.save_config(d)
        return json.loads((Path(d) / "scheduler_config.json").read_text())


SDXL = SDXL_SCHEDULER_CONFIG
CONFIGS = {
    "sdxl": SDXL,
    # Built in code and saved: linear betas, linspace spacing, offset 0, no DDIM/DPM keys.
    "euler_in_code": saved(EulerDiscreteScheduler()),
    "ddim_default": saved(DDIMScheduler()),
    "dpm_default": saved(DPMSolverMultistepScheduler()),
    "euler_a_default": saved(EulerAncestralDiscreteScheduler()),
    # An in-memory config lists the keys its class defaulted: from_config drops them.
    "in_memory": dict(EulerDiscreteScheduler(beta_schedule="scaled_linear").config),
    "clip": {**SDXL, "clip_sample": True, "clip_sample_range": 0.5},
    "threshold": {
        **SDXL,
        "thresholding": True,
        "dynamic_thresholding_ratio": 0.9,
        "sample_max_value": 2.0,
    },
    "alpha_one": {**SDXL, "set_alpha_to_one": True},
    "sigma_min_final": {**SDXL, "final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler_at_final": {**SDXL, "final_sigmas_type": "sigma_min", "euler_at_final": True},
    "first_order": {**SDXL, "solver_order": 1, "timestep_spacing": "trailing"},
    "karras_range": {**SDXL, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 8.0},
    "continuous_eps": {**SDXL, "timestep_type": "continuous", "lambda_min_clipped": -5.1},
}
# __init__ arguments that change nothing for these samplers: DPM's flow-matching shift (only
# with use_flow_sigmas, refused) and dynamic shifting (only with a ``mu`` SDXL never passes).
NO_EFFECT = {"dpmpp_2m": {"flow_shift", "use_dynamic_shifting", "time_shift_type"}}


def test_settings_cover_each_class_and_its_defaults():
    for sampler, cls in SCHEDULERS.items():
        with case(sampler=sampler):
            params = inspect.signature(cls.__init__).parameters
            args = set(params) - {"self"}
            read = {**COMMON_DEFAULTS, **CLASS_DEFAULTS[sampler]}
            assert args - set(read) == NO_EFFECT.get(sampler, set())
            # DPM reads sigma_min / sigma_max from the config it was made from (Karras).
            extra = {"sigma_min", "sigma_max"} if sampler == "dpmpp_2m" else set()
            assert set(read) - args == extra
            for k in args & set(read):
                assert read[k] == params[k].default, k


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_settings_match_from_config(sampler):
    """Every setting we resolve equals the one diffusers' scheduler holds after from_config."""
    for name, cfg in CONFIGS.items():
        with case(config=name):
            ref = make_scheduler(sampler, config=cfg).config
            got = NoiseSchedule.from_scheduler_config(cfg).settings(sampler)
            for k, v in got.items():
                want = ref.get(k)
                if k == "timestep_spacing" or not isinstance(v, float) or math.isinf(v):
                    assert v == want, (k, v, want)
                else:
                    assert v == pytest.approx(want, rel=1e-12), k


# (sampler, config, steps): the plan and, for the deterministic samplers, the sampled result.
CASES = [
    ("ddim", "euler_in_code", 10),
    ("ddim", "ddim_default", 10),
    ("ddim", "in_memory", 10),
    ("ddim", "clip", 10),
    ("ddim", "threshold", 10),
    ("ddim", "alpha_one", 10),
    ("euler", "euler_in_code", 10),
    ("euler", "ddim_default", 10),
    ("euler", "sigma_min_final", 10),
    ("euler", "karras_range", 10),
    ("euler", "continuous_eps", 10),
    ("euler_a", "euler_in_code", 10),
    ("euler_a", "ddim_default", 10),
    ("dpmpp_2m", "euler_in_code", 10),
    ("dpmpp_2m", "dpm_default", 10),
    ("dpmpp_2m", "threshold", 10),
    ("dpmpp_2m", "sigma_min_final", 20),  # >= 15 steps: a second-order last step
    ("dpmpp_2m", "euler_at_final", 20),
    ("dpmpp_2m", "first_order", 10),
    ("dpmpp_2m", "karras_range", 10),
    ("dpmpp_2m", "continuous_eps", 10),
]
CASE_IDS = [f"{s}-{c}-{n}" for s, c, n in CASES]


def _plan_and_scheduler(sampler, name, steps):
    cfg = CONFIGS[name]
    sched = make_scheduler(sampler, config=cfg)
    sched.set_timesteps(steps)
    return sampler_steps(NoiseSchedule.from_scheduler_config(cfg), sampler, steps), sched


@pytest.mark.parametrize(("sampler", "name", "steps"), CASES, ids=CASE_IDS)
def test_plan_matches_from_config(sampler, name, steps):
    p, sched = _plan_and_scheduler(sampler, name, steps)
    karras = bool(sched.config.get("use_karras_sigmas"))
    assert_plan_matches(p, sched, sampler, karras, sigma_atol=2e-6)
    assert p.init_scale == pytest.approx(float(sched.init_noise_sigma), rel=5e-5)
    assert p.karras == karras
    if sampler == "dpmpp_2m":
        assert p.order.tolist() == dpm_orders(sched, sched.timesteps)


DETERMINISTIC = [c for c in CASES if c[0] != "euler_a"]


@pytest.mark.parametrize(
    ("sampler", "name", "steps"), DETERMINISTIC, ids=[f"{s}-{c}-{n}" for s, c, n in DETERMINISTIC]
)
def test_sampling_matches_from_config(sampler, name, steps):
    """The whole run against diffusers' loop, exact Gaussian epsilon model (tests/diffusion/
    test_samplers.py): N(MU, STD^2) data reach |x0| > 1, so clipping and thresholding act."""
    p, sched = _plan_and_scheduler(sampler, name, steps)
    x = start_noise(6)
    ref = diffusers_loop(sched, torch.from_numpy(x) * sched.init_noise_sigma, sched.timesteps)
    assert_parity(ours(p, x * np.float32(p.init_scale)), ref)


def test_the_settings_change_the_samples():
    """The configs above would not catch a sampler that ignored them: against SDXL's config,
    diffusers' results differ by far more than the parity tolerance."""
    x = torch.from_numpy(start_noise(6))

    def run(sampler, cfg):
        sched = make_scheduler(sampler, config=cfg)
        sched.set_timesteps(10)
        return diffusers_loop(sched, x * sched.init_noise_sigma, sched.timesteps).numpy()

    for sampler, name, neutral in [
        ("ddim", "clip", {"clip_sample": False}),
        ("ddim", "threshold", {"thresholding": False}),
        ("ddim", "alpha_one", {"set_alpha_to_one": False}),
        ("ddim", "euler_in_code", {"clip_sample": False, "set_alpha_to_one": False}),
        ("dpmpp_2m", "threshold", {"thresholding": False}),
    ]:
        with case(sampler=sampler, config=name):
            cfg = CONFIGS[name]
            assert (
                np.abs(run(sampler, cfg) - run(sampler, {**cfg, **neutral})).max()
                > 20 * PARITY_ATOL
            )


# --- refusals ----------------------------------------------------------------------------------

# (sampler, settings on top of SDXL's config, the key the refusal names)
REFUSED = [
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
    ("euler", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
    ("dpmpp_2m", {"solver_type": "heun"}, "solver_type"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp_2m", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
    ("dpmpp_2m", {"lambda_min_clipped": -1.0}, "lambda_min_clipped"),
    ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "thresholding_ratio"),
]


@pytest.mark.parametrize(("sampler", "extra", "key"), REFUSED, ids=[r[2] for r in REFUSED])
def test_unimplemented_settings_are_refused_in_one_line(sampler, extra, key):
    schedule = NoiseSchedule.from_scheduler_config({**SDXL, **extra})
    with pytest.raises(ValueError, match=f"{key}=.*supported: ") as err:
        sampler_steps(schedule, sampler, 10)
    assert "\n" not in str(err.value) and sampler in str(err.value)
    # A class that does not read the setting ignores it, as diffusers does.
    for other in SAMPLERS:
        settings = {**COMMON_DEFAULTS, **CLASS_DEFAULTS[other]}
        if not set(extra) & (set(settings) - {"prediction_type"}):
            p = sampler_steps(schedule, other, 10)
            np.testing.assert_array_equal(p.t, sampler_steps(NoiseSchedule(), other, 10).t)


def test_settings_every_class_reads_are_refused_on_reading():
    for extra in (
        {"rescale_betas_zero_snr": True},
        {"trained_betas": [1e-3] * 1000},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"prediction_type": "sample"},
    ):
        key = next(iter(extra))
        with case(key=key), pytest.raises(ValueError, match=f"{key}"):
            NoiseSchedule.from_scheduler_config({**SDXL, **extra})


def test_clip_and_threshold_only_where_the_class_has_them():
    clip = NoiseSchedule.from_scheduler_config(CONFIGS["clip"])
    thr = NoiseSchedule.from_scheduler_config(CONFIGS["threshold"])
    assert sampler_steps(clip, "ddim", 5).clip == 0.5
    assert sampler_steps(thr, "ddim", 5).threshold == (0.9, 2.0)
    assert sampler_steps(thr, "dpmpp_2m", 5).threshold == (0.9, 2.0)
    for sampler in ("euler", "euler_a", "dpmpp_2m"):
        assert sampler_steps(clip, sampler, 5).clip == math.inf
    for sampler in ("euler", "euler_a"):
        assert sampler_steps(thr, sampler, 5).threshold is None
    # Without a scheduler config: SDXL's published settings (no clipping, alpha_bar[0] last).
    p = sampler_steps(NoiseSchedule(), "ddim", 5)
    assert (p.clip, p.threshold) == (math.inf, None) and p.sigma_next[-1] > 0.02


# --- end to end: python -m sdxl_jax.sample ------------------------------------------------------


def _with_scheduler(base: Path, folder: Path, config: dict) -> Path:
    shutil.copytree(base, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow(seconds=40)
def test_sample_ddim_on_a_scheduler_saved_from_code(tiny_sdxl, tmp_path):
    """A pipeline whose scheduler was saved from ``EulerDiscreteScheduler()``, sampled with
    ``--sampler ddim``: diffusers' ``DDIMScheduler.from_config`` clips x0 and ends at
    alpha_bar = 1 there (the bug: 47.8/255 apart on such a pipeline)."""
    from tests.test_sample import assert_same_images, noise_file

    folder = _with_scheduler(tiny_sdxl[0], tmp_path / "ckpt", CONFIGS["euler_in_code"])
    noise, path = noise_file(tmp_path, 1, seed=4)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red circle"], num_inference_steps=10, guidance_scale=6.0, height=64,
              width=64, output_type="np")  # fmt: skip
    images = {}
    sdxl_values = {"clip_sample": False, "set_alpha_to_one": False}
    for name, over in (("ddim", {}), ("sdxl_values", sdxl_values)):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **over)
        with torch.no_grad():
            images[name] = pipe(latents=torch.from_numpy(noise), **kw).images
    assert np.abs(images["ddim"] - images["sdxl_values"]).mean() > 5 / 255
    out = tmp_path / "out"
    rc = sample.main([
        "--checkpoint", str(folder), "--prompt", "a red circle", "--noise", str(path),
        "--sampler", "ddim", "--steps", "10", "--guidance", "6", "--height", "64",
        "--width", "64", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    from PIL import Image

    got = np.stack([np.asarray(Image.open(out / r["file"])) for r in manifest["images"]])
    assert_same_images(got.astype(np.float32) / 255, images["ddim"])


def test_sample_refuses_a_setting_it_does_not_implement(tiny_sdxl, tmp_path, capsys):
    folder = _with_scheduler(
        tiny_sdxl[0], tmp_path / "ckpt", {**SDXL, "interpolation_type": "log_linear"}
    )
    rc = sample.main(["--checkpoint", str(folder), "--prompt", "x", "--steps", "2",
                      "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "interpolation_type='log_linear'" in err and "supported: 'linear'" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()
