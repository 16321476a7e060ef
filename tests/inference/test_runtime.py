"""Pipeline pieces not covered by the image-parity tests: tiled VAE decode, stage checks."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from sdxl_jax.inference import checkpoints, runtime


def test_vae_decode_matches_diffusers_and_tiles_blend(tiny_sdxl):
    base, _ = tiny_sdxl
    mesh = runtime.make_mesh()
    vae = runtime.load_vae(base, mesh)
    latents = np.random.default_rng(0).standard_normal((8, 12, 20, 4)).astype(np.float32)
    ref = AutoencoderKL.from_pretrained(base / "vae").eval()
    with torch.no_grad():
        x = torch.from_numpy(latents.transpose(0, 3, 1, 2)) / ref.config.scaling_factor
        want = ref.decode(x).sample.numpy().transpose(0, 2, 3, 1)
    want = np.round(np.clip(want / 2 + 0.5, 0, 1) * 255)
    vae.tile = 0
    full = vae.decode(latents).astype(np.float32)
    assert full.shape == (8, 96, 160, 3)
    assert np.abs(full - want).max() <= 1  # rounding only
    # Tiles of 8 latents overlapping by 4: 2 x 4 tiles. The VAE's mid-block attention is
    # global, so tiles cannot equal the full decode; they must agree broadly and blend smoothly.
    vae.tile, vae.overlap = 8, 4
    tiled = vae.decode(latents).astype(np.float32)
    assert tiled.shape == full.shape
    assert np.abs(tiled - full).mean() < 0.25 * np.abs(full - full.mean()).mean()
    # No seam: the jump across a tile border is no larger than elsewhere in the image.
    cols = np.abs(np.diff(tiled, axis=2)).mean(axis=(0, 1, 3))
    assert cols[4 * 8 - 1 : 4 * 8 + 1].max() < 3 * np.median(cols)


def test_check_stage_reads_roles_and_flags(tiny_sdxl):
    base, refiner = tiny_sdxl
    b = checkpoints.check_stage(base)
    r = checkpoints.check_stage(refiner, need_vae=False)
    assert (b.role, b.force_zeros_for_empty_prompt) == ("base", True)
    assert (r.role, r.force_zeros_for_empty_prompt) == ("refiner", False)
    assert "text_encoder" not in r.components
    assert b.schedule.steps_offset == 1 and b.schedule.timestep_spacing == "leading"


def test_single_file_needs_tokenizers(tiny_sdxl, tmp_path):
    info = checkpoints.check_stage(tiny_sdxl[0])
    single = checkpoints.StageInfo(
        tmp_path / "x.safetensors", "single-file", "base", info.components, info.configs,
        True, info.schedule,
    )  # fmt: skip
    with pytest.raises(ValueError, match="pass --tokenizers DIR"):
        runtime.load_stage(single)
