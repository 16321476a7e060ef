"""Checks of the tiny diffusers SDXL reference pipelines in ``tiny_pipelines``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from open_clip.tokenizer import SimpleTokenizer
from safetensors.numpy import load_file
from transformers import CLIPTokenizer

from tests.diffusion import tiny_pipelines as tp

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


def _check_images(images: np.ndarray, n: int, size: int) -> None:
    assert images.shape == (n, size, size, 3)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.05 / 2  # [0, 1] range: std > 0.05 in [-1, 1]
    clipped = np.mean((images <= 0.0) | (images >= 1.0))
    assert clipped < 0.5, clipped
    assert np.abs(images[0] - images[1]).mean() > 1e-3  # different prompts, different latents


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tp.build_both(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)


def test_tokenizers_match_open_clip(tmp_path: Path) -> None:
    tp.write_clip_tokenizer(tmp_path / "tok1", tp.PAD_TOKEN_1)
    tp.write_clip_tokenizer(tmp_path / "tok2", tp.PAD_TOKEN_2)
    tok1 = CLIPTokenizer.from_pretrained(tmp_path / "tok1")
    tok2 = CLIPTokenizer.from_pretrained(tmp_path / "tok2")

    reference = SimpleTokenizer()
    vocab, merges = tp.clip_vocab_and_merges()
    assert len(vocab) == len(reference.encoder) == tp.VOCAB_SIZE
    # open_clip names its two special tokens differently; everything else is identical.
    ref_items = sorted(reference.encoder.items(), key=lambda kv: kv[1])
    ours = sorted(vocab.items(), key=lambda kv: kv[1])
    assert ours[: tp.BOS_ID] == ref_items[: tp.BOS_ID]
    assert merges == list(reference.bpe_ranks)
    assert json.loads((tmp_path / "tok1" / "vocab.json").read_text("utf-8")) == vocab

    text = "a photo of a cat"
    body = reference.encode(text)
    expected = [reference.sot_token_id, *body, reference.eot_token_id]
    assert expected[0] == tp.BOS_ID and expected[-1] == tp.EOS_ID
    ref_padded = open_clip.tokenize([text])[0].tolist()  # pads with 0 == "!"
    assert ref_padded[: len(expected)] == expected

    for tok in (tok1, tok2):
        assert tok.model_max_length == 77
        assert tok(text).input_ids == expected
    ids1 = tok1(text, padding="max_length", max_length=77, truncation=True).input_ids
    ids2 = tok2(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert tok1.pad_token_id == tp.EOS_ID and tok2.pad_token_id == 0
    assert ids1 == expected + [tp.EOS_ID] * (77 - len(expected))
    assert ids2 == ref_padded

    # A longer prompt with punctuation and digits, through tokenizer 1 (whose pad is EOS).
    text = "Two dogs, 3 cats: a photograph's colours (1990)"
    assert (
        tok1(text).input_ids == open_clip.tokenize([text])[0][: len(tok1(text).input_ids)].tolist()
    )


def test_saved_folders(folders: tuple[Path, Path]) -> None:
    base, refiner = folders
    base_index = json.loads((base / "model_index.json").read_text())
    ref_index = json.loads((refiner / "model_index.json").read_text())
    assert base_index["_class_name"] == "StableDiffusionXLPipeline"
    assert base_index["force_zeros_for_empty_prompt"] is True
    assert ref_index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert ref_index["requires_aesthetics_score"] is True
    assert ref_index["force_zeros_for_empty_prompt"] is False
    assert ref_index["text_encoder"] == [None, None] and ref_index["tokenizer"] == [None, None]
    for sub in ("tokenizer", "tokenizer_2"):
        assert (base / sub / "vocab.json").exists() and (base / sub / "merges.txt").exists()

    # Same VAE in both folders, with a nearly deterministic posterior.
    vae_base = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    vae_ref = load_file(refiner / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae_base.keys() == vae_ref.keys()
    for key, value in vae_base.items():
        np.testing.assert_array_equal(value, vae_ref[key], err_msg=key)
    assert np.all(vae_base["quant_conv.weight"][4:] == 0.0)
    assert np.all(vae_base["quant_conv.bias"][4:] == -30.0)

    # The UNet output projection is not ~0 and the two UNets differ.
    unet_base = load_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    unet_ref = load_file(refiner / "unet" / "diffusion_pytorch_model.safetensors")
    assert np.abs(unet_base["conv_out.weight"]).mean() > 1e-2
    assert unet_base["add_embedding.linear_1.weight"].shape[1] == 6 * 8 + 48
    assert unet_ref["add_embedding.linear_1.weight"].shape[1] == 5 * 8 + 48
    assert not np.array_equal(unet_base["conv_out.weight"], unet_ref["conv_out.weight"])

    # Deterministic: rebuilding with the same seed gives the same weights.
    tp.build_base(base.parent / "base_again")
    again = load_file(base.parent / "base_again" / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in unet_base.items():
        np.testing.assert_array_equal(value, again[key], err_msg=key)


def test_base_and_refiner_images(folders: tuple[Path, Path], latents: np.ndarray) -> None:
    base, refiner = folders
    kwargs = dict(prompt=PROMPTS, latents=latents, steps=4, guidance=5.0, height=64, width=64)
    images = tp.reference_images(base, sampler="euler", **kwargs)
    _check_images(images, 2, 64)
    # The UNet matters: the guidance scale and the sampler change the result.
    no_cfg = tp.reference_images(base, sampler="euler", **{**kwargs, "guidance": 1.0})
    assert np.abs(images - no_cfg).mean() > 1e-2
    dpm = tp.reference_images(base, sampler="dpmpp_2m", **kwargs)
    _check_images(dpm, 2, 64)
    assert np.abs(images - dpm).mean() > 1e-3

    handoff = tp.reference_images(
        base, sampler="euler", denoising_end=0.75, output_type="latent", **kwargs
    )
    assert handoff.shape == (2, 4, 8, 8) and np.isfinite(handoff).all()
    refined = tp.reference_refine(
        refiner,
        prompt=PROMPTS,
        image_latents=handoff,
        sampler="euler",
        steps=4,
        guidance=5.0,
        denoising_start=0.75,
    )
    _check_images(refined, 2, 64)


def test_img2img_noise(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base, _ = folders
    captured: dict[str, torch.Tensor] = {}
    original_add_noise = DDIMScheduler.add_noise

    def spy(self, original_samples, noise, timesteps):
        captured.update(original=original_samples.clone(), noise=noise.clone(), t=timesteps)
        return original_add_noise(self, original_samples, noise, timesteps)

    monkeypatch.setattr(DDIMScheduler, "add_noise", spy)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    images, noise = tp.reference_img2img(
        base,
        prompt=PROMPTS,
        image=image,
        strength=0.6,
        sampler="ddim",
        steps=5,
        guidance=5.0,
        seed=123,
    )
    _check_images(images, 2, 64)
    assert noise.shape == (2, 4, 8, 8) and noise.dtype == np.float32
    np.testing.assert_array_equal(noise, captured["noise"].numpy())

    # The posterior is nearly deterministic: init latents = scaling_factor * posterior mean.
    vae = AutoencoderKL.from_pretrained(base / "vae")
    pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    assert float(posterior.std.max()) < 1e-6
    expected = posterior.mean * vae.config.scaling_factor
    np.testing.assert_allclose(captured["original"].numpy(), expected.numpy(), atol=1e-5)
