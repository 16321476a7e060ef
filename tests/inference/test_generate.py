"""The library ``generate()``: size and crop micro-conditioning against diffusers' SDXL pipelines
(base alone, base + refiner), image for image, and a Generator reused without recompiling."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl_jax.inference import generate
from tests.diffusion import tiny_pipelines as ref

H, W = 64, 48
PROMPTS = ["a red circle in the top left", "a blue square on green grass"]
MICRO = dict(original_size=(512, 1024), crop=(160, 96))  # diffusers: (height, width), (top, left)


def _noise(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4, H // 8, W // 8)).astype(np.float32)


def _assert_same(got_uint8, want01):
    got = got_uint8.astype(np.float32) / 255
    assert got.shape == want01.shape and want01.std() > 0.05
    assert np.abs(got - want01).mean() <= 1 / 255


def _diffusers(cls, folder, sampler, **kw):
    pipe = ref._load(cls, folder, sampler)
    with torch.no_grad():
        return pipe(**kw).images


def test_size_and_crop_conditioning_match_diffusers(tiny_sdxl):
    base, _ = tiny_sdxl
    noise = _noise(len(PROMPTS))
    common = dict(num_inference_steps=8, guidance_scale=6.0, height=H, width=W, output_type="np")
    want = _diffusers(
        StableDiffusionXLPipeline, base, "euler", prompt=PROMPTS,
        latents=torch.from_numpy(noise), original_size=MICRO["original_size"],
        crops_coords_top_left=MICRO["crop"], **common,
    )  # fmt: skip
    got = generate.generate(
        PROMPTS, base, steps=8, guidance=6.0, sampler="euler", height=H, width=W, noise=noise,
        **MICRO,
    )  # fmt: skip
    _assert_same(got.images, want)
    # The conditioning reaches the model: the default (target size, no crop) draws otherwise.
    plain = _diffusers(
        StableDiffusionXLPipeline, base, "euler", prompt=PROMPTS,
        latents=torch.from_numpy(noise), **common,
    )  # fmt: skip
    assert np.abs(plain - want).mean() > 2 / 255
    assert [r["prompt"] for r in got.records] == PROMPTS
    assert got.images.dtype == np.uint8 and got.timings["first_batch_s"] > 0


def test_refiner_micro_conditioning_matches_diffusers(tiny_sdxl):
    """The refiner's negative branch keeps crop (0, 0), as diffusers' img2img pipeline does."""
    base, refiner = tiny_sdxl
    noise = _noise(1, seed=4)
    kw = dict(num_inference_steps=10, guidance_scale=5.0)
    micro = dict(original_size=MICRO["original_size"], crops_coords_top_left=MICRO["crop"])
    latents = _diffusers(
        StableDiffusionXLPipeline, base, "euler", prompt=PROMPTS[:1],
        latents=torch.from_numpy(noise), height=H, width=W, denoising_end=0.8,
        output_type="latent", **micro, **kw,
    )  # fmt: skip
    want = _diffusers(
        StableDiffusionXLImg2ImgPipeline, refiner, "euler", prompt=PROMPTS[:1],
        image=latents, denoising_start=0.8, output_type="np", **micro, **kw,
    )  # fmt: skip
    got = generate.generate(
        PROMPTS[:1], base, refiner=refiner, handoff=0.8, steps=10, guidance=5.0,
        sampler="euler", height=H, width=W, noise=noise, **MICRO,
    )  # fmt: skip
    _assert_same(got.images, want)
    # Both branches' vectors as diffusers builds them (the images barely show the negative's).
    pipe = ref._load(StableDiffusionXLImg2ImgPipeline, refiner, "euler")
    size, crop = MICRO["original_size"], MICRO["crop"]
    pos, neg = pipe._get_add_time_ids(
        size, crop, (H, W), 6.0, 2.5, size, (0, 0), (H, W), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    gen = generate.Generator(generate.check_models(base, refiner=refiner))
    cond = gen.refiner.conditioning(PROMPTS[:1] * gen.batch_size, None, H, W, True, **MICRO)
    np.testing.assert_array_equal(np.asarray(cond.time_ids)[:1], pos.numpy())
    np.testing.assert_array_equal(np.asarray(cond.neg_time_ids)[:1], neg.numpy())


def test_a_generator_is_reused_without_recompiling(tiny_sdxl):
    base, _ = tiny_sdxl
    models = generate.check_models(base)
    gen = generate.Generator(models, batch_size=8)
    first = gen(generate.make_request(models, PROMPTS, steps=3, height=H, width=W, seed=2))
    again = gen(generate.make_request(models, PROMPTS[::-1], steps=3, height=H, width=W, seed=2))
    # One compiled denoising loop for both calls (same batch and image shape).
    assert gen.base._denoise._cache_size() == 1
    # Image k's noise depends on (seed, k) only: swapping the prompts swaps the conditioning.
    assert np.abs(first.images[0].astype(int) - again.images[0]).mean() > 1
    one = gen(generate.make_request(models, PROMPTS[:1], steps=3, height=H, width=W, seed=2))
    assert np.abs(one.images[0].astype(int) - first.images[0]).max() <= 1


def test_settings_are_checked_before_anything_loads(tiny_sdxl):
    base, refiner = tiny_sdxl
    models = generate.check_models(base)
    with pytest.raises(generate.UsageError, match="not a positive multiple of 8"):
        generate.make_request(models, PROMPTS, height=60)
    with pytest.raises(generate.UsageError, match="expected float32"):
        generate.make_request(models, PROMPTS, noise=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(generate.UsageError, match="is an SDXL base, not a refiner"):
        generate.check_models(base, refiner=base)
    with pytest.raises(generate.UsageError, match="is an SDXL refiner"):
        generate.make_request(generate.check_models(refiner), PROMPTS)
