"""The frozen text side of the tiny stages: ``model.checkpoint = "frozen"`` names a folder in
the workdir holding tiny random CLIP-L / bigG text encoders and tokenizers for the synthetic
dataset's vocabulary, made on first use (a diffusers folder without UNet or VAE)."""

from __future__ import annotations

from pathlib import Path

TINY_FROZEN = "frozen"  # tiny configs: random tiny text encoders, made in the workdir on first use


def build_tiny_frozen(folder: str | Path, seed: int = 0) -> Path:
    """Tiny random CLIP-L / bigG text encoders and synthetic-vocabulary tokenizers: the frozen
    text side of the tiny stages (a diffusers folder without UNet or VAE)."""
    from flax import nnx

    from sdxl_jax.data.tokenizer import write_synthetic_tokenizers
    from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from sdxl_jax.weights import diffusers_io

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    clip_l = CLIPTextModel(CLIPTextConfig.tiny(), rngs=nnx.Rngs(seed))
    clip_g = CLIPTextModel(CLIPTextConfig.tiny_bigg(), rngs=nnx.Rngs(seed + 1))
    diffusers_io.save_component(clip_l, tmp, "text_encoder")
    diffusers_io.save_component(clip_g, tmp, "text_encoder_2")
    write_synthetic_tokenizers(tmp)
    tmp.rename(folder)  # complete or absent
    return folder
