"""Tiny random SDXL pipelines built with diffusers, used as offline references.

Everything here runs on the CPU in fp32 and takes a few seconds: the models are SDXL-shaped
(two CLIP text encoders, ``text_time`` conditioned UNet with linear projections, VAE with a
scale factor of 8, SDXL's published Euler scheduler config) but only a few channels wide.

``build_base`` / ``build_refiner`` save diffusers folders that ``from_pretrained`` can load with
no model hub; the ``reference_*`` functions run the diffusers pipelines on such folders so that
another implementation can be compared against them.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sdxl_jax.data.tokenizer import BOS_TOKEN, END, EOS_TOKEN, bytes_to_unicode
from sdxl_jax.diffusion.schedule import SDXL_SCHEDULER_CONFIG
from tests.diffusion.schedulers import make_scheduler

VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77
# SDXL's first tokenizer pads with the end-of-text token, the second with "!" (id 0).
PAD_TOKEN_1 = EOS_TOKEN
PAD_TOKEN_2 = "!"


ADD_TIME_DIM = 8  # addition_time_embed_dim (256 in SDXL)
TEXT1_WIDTH = 32  # text_encoder hidden size (768 in SDXL)
TEXT2_WIDTH = 64  # text_encoder_2 hidden size (1280 in SDXL)
POOLED_WIDTH = 48  # text_encoder_2 projection_dim (1280 in SDXL)

SAMPLERS = ("euler", "ddim", "dpmpp_2m", "euler_a")


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-token vocabulary and its 48894 BPE merges, from open_clip's BPE file."""
    vocab, merges = _clip_vocab_and_merges()
    return dict(vocab), list(merges)


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())  # in CLIP's vocabulary order
    tokens = base + [ch + END for ch in base] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE
    return vocab, merges


def make_clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer (77 tokens max) padding with ``pad_token``."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    """Save a real CLIP tokenizer padding with ``pad_token`` into ``folder``.

    ``CLIPTokenizer.from_pretrained(folder)`` then works offline. SDXL's ``tokenizer`` pads with
    ``"<|endoftext|>"`` and its ``tokenizer_2`` with ``"!"``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_clip_tokenizer(pad_token).save_pretrained(folder)
    _write_vocab_files(folder)


def _write_vocab_files(folder: Path) -> None:
    """Write the classic ``vocab.json`` / ``merges.txt`` next to ``tokenizer.json``.

    transformers 5 only saves ``tokenizer.json`` + ``tokenizer_config.json``; the released SDXL
    folders ship ``vocab.json`` + ``merges.txt`` instead, so provide both layouts.
    """
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(text, "utf-8")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT1_WIDTH,
        intermediate_size=2 * TEXT1_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT1_WIDTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    return CLIPTextModel(config).eval()


def _text_encoder_2() -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT2_WIDTH,
        intermediate_size=2 * TEXT2_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=POOLED_WIDTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,  # as in SDXL's text_encoder_2 config (unused by the model)
    )
    return CLIPTextModelWithProjection(config).eval()


def _reinit_conv_out(unet: UNet2DConditionModel, seed: int) -> None:
    """Give ``conv_out`` a clearly non-zero output (std ~1 for unit-variance features)."""
    gen = torch.Generator().manual_seed(seed)
    weight = unet.conv_out.weight
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=gen) / fan_in**0.5)
        unet.conv_out.bias.copy_(0.1 * torch.randn(unet.conv_out.bias.shape, generator=gen))


def _base_unet(seed: int) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=TEXT1_WIDTH + TEXT2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_DIM + POOLED_WIDTH,
        use_linear_projection=True,
    ).eval()
    _reinit_conv_out(unet, seed + 1000)
    return unet


def _refiner_unet(seed: int) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=TEXT2_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_DIM,
        projection_class_embeddings_input_dim=5 * ADD_TIME_DIM + POOLED_WIDTH,
        use_linear_projection=True,
    ).eval()
    _reinit_conv_out(unet, seed + 1000)
    return unet


VAE_SEED = 1234


def _vae() -> AutoencoderKL:
    """Tiny SDXL-like VAE (scale factor 8) whose posterior is nearly deterministic.

    The rows of ``quant_conv`` producing the 4 log-variance channels (outputs 4..7) are zeroed and
    their bias set to -30, so the posterior std is exp(-15) ~ 3e-7 for every input: an
    implementation drawing its own posterior noise still gets the same latents as diffusers.
    Built from a fixed seed so the base and refiner folders share the same VAE weights.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(VAE_SEED)
    try:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=8,
            layers_per_block=1,
            sample_size=64,
            scaling_factor=0.13025,
            force_upcast=True,
        ).eval()
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        vae.quant_conv.weight[4:8] = 0.0
        vae.quant_conv.bias[4:8] = -30.0
    return vae


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)


def build_base(folder: Path, seed: int = 0) -> None:
    """Save a tiny random ``StableDiffusionXLPipeline`` (fp32, safetensors) into ``folder``.

    Context = concat of both encoders' penultimate states (32 + 64 = 96 wide); pooled = the
    48-wide projection of ``text_encoder_2``; 6 time ids of 8 channels each.
    """
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(),
        text_encoder_2=_text_encoder_2(),
        tokenizer=make_clip_tokenizer(PAD_TOKEN_1),
        tokenizer_2=make_clip_tokenizer(PAD_TOKEN_2),
        unet=_base_unet(seed),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_vocab_files(Path(folder) / "tokenizer")
    _write_vocab_files(Path(folder) / "tokenizer_2")


def build_refiner(folder: Path, seed: int = 1) -> None:
    """Save a tiny random refiner ``StableDiffusionXLImg2ImgPipeline`` into ``folder``.

    Like SDXL's refiner it has no first text encoder (context = ``text_encoder_2``'s 64-wide
    penultimate states), uses 5 time ids (original size, crop, aesthetic score) and
    ``force_zeros_for_empty_prompt=False``. The VAE is identical to ``build_base``'s.
    """
    torch.manual_seed(seed)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(),
        text_encoder=None,
        text_encoder_2=_text_encoder_2(),
        tokenizer=None,
        tokenizer_2=make_clip_tokenizer(PAD_TOKEN_2),
        unet=_refiner_unet(seed),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _write_vocab_files(Path(folder) / "tokenizer_2")


def build_both(folder: Path) -> tuple[Path, Path]:
    """Build base and refiner into ``folder/base`` and ``folder/refiner``; return both paths."""
    base, refiner = Path(folder) / "base", Path(folder) / "refiner"
    build_base(base)
    build_refiner(refiner)
    return base, refiner


# --------------------------------------------------------------------------------------------
# Reference runs
# --------------------------------------------------------------------------------------------


def _load(cls, folder: Path, sampler: str):
    pipe = cls.from_pretrained(folder).to(dtype=torch.float32)
    pipe.scheduler = make_scheduler(sampler, config=pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_numpy(out: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


@torch.no_grad()
def reference_images(
    folder: Path,
    *,
    prompt: list[str],
    latents: np.ndarray,
    sampler: str,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    negative_prompt: list[str] | None = None,
    denoising_end: float | None = None,
    output_type: str = "np",
    seed: int = 0,
    **micro: tuple[int, int],
) -> np.ndarray:
    """Run the diffusers base pipeline in ``folder`` from the given initial ``latents``.

    ``micro``: the pipeline's ``original_size`` / ``crops_coords_top_left`` (micro-conditioning).

    ``latents`` is [N, 4, H/8, W/8] standard normal (diffusers scales it by the initial sigma).
    ``seed`` only feeds the generator of stochastic samplers (``euler_a``). Returns images
    [N, H, W, 3] in [0, 1] (``output_type="np"``) or the final latents [N, 4, H/8, W/8]
    (``output_type="latent"``, e.g. with ``denoising_end`` to hand off to the refiner).
    """
    pipe = _load(StableDiffusionXLPipeline, folder, sampler)
    out = pipe(
        prompt=list(prompt),
        negative_prompt=None if negative_prompt is None else list(negative_prompt),
        latents=torch.from_numpy(np.asarray(latents, dtype=np.float32)),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        denoising_end=denoising_end,
        output_type=output_type,
        generator=torch.Generator().manual_seed(seed),
        **micro,
    ).images
    return _to_numpy(out)


@torch.no_grad()
def reference_refine(
    folder: Path,
    *,
    prompt: list[str],
    image_latents: np.ndarray,
    sampler: str,
    steps: int,
    guidance: float,
    denoising_start: float,
    negative_prompt: list[str] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Run the diffusers refiner in ``folder`` on base latents (no noise is added).

    ``image_latents`` is the base pipeline's ``output_type="latent"`` output [N, 4, h, w].
    Default aesthetic scores (6.0 / 2.5) are used. Returns images [N, H, W, 3] in [0, 1].
    """
    pipe = _load(StableDiffusionXLImg2ImgPipeline, folder, sampler)
    out = pipe(
        prompt=list(prompt),
        negative_prompt=None if negative_prompt is None else list(negative_prompt),
        image=torch.from_numpy(np.asarray(image_latents, dtype=np.float32)),
        num_inference_steps=steps,
        guidance_scale=guidance,
        denoising_start=denoising_start,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
    return _to_numpy(out)


def img2img_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The noise diffusers' SDXL img2img adds to the init latents for ``generator`` = ``seed``.

    With a single CPU generator, diffusers first draws the VAE posterior sample's noise and then
    the added noise, both of the latent shape, so the second draw is the added noise.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=gen)  # VAE posterior sample
    return torch.randn(shape, generator=gen).numpy().astype(np.float32)


@torch.no_grad()
def reference_img2img(
    folder: Path,
    *,
    prompt: list[str],
    image: np.ndarray,
    strength: float,
    sampler: str,
    steps: int,
    guidance: float,
    seed: int,
    negative_prompt: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``StableDiffusionXLImg2ImgPipeline`` loaded from the base ``folder``.

    ``image`` is uint8 [N, H, W, 3]. Returns (images [N, H, W, 3] in [0, 1], the noise
    [N, 4, H/8, W/8] diffusers added to the encoded image latents).
    """
    image = np.asarray(image)
    assert image.dtype == np.uint8 and image.ndim == 4, (image.dtype, image.shape)
    pipe = _load(StableDiffusionXLImg2ImgPipeline, folder, sampler)
    out = pipe(
        prompt=list(prompt),
        negative_prompt=None if negative_prompt is None else list(negative_prompt),
        image=image.astype(np.float32) / 255.0,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
    n, h, w, _ = image.shape
    noise = img2img_noise((n, 4, h // 8, w // 8), seed)
    return _to_numpy(out), noise
