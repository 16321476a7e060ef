"""Which SDXL model a single file holds, told from its keys (as in the released files)."""

import pytest

from sdxl_jax.weights.single_file import detect_layout

UNET = ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias"]
VAE = ["first_stage_model.decoder.conv_out.weight"]
CLIP_L = ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]


def test_base_file():
    bigg = [
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.text_projection",
    ]
    layout = detect_layout(UNET + VAE + CLIP_L + bigg)
    assert layout.kind == "base"
    assert layout.prefixes == {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    }
    assert layout.config("unet").cross_attention_dim == 2048


def test_refiner_file():
    bigg0 = ["conditioner.embedders.0.model.ln_final.weight"]
    layout = detect_layout(UNET + VAE + bigg0)
    assert layout.kind == "refiner"
    assert layout.prefixes["text_encoder_2"] == "conditioner.embedders.0.model."
    assert "text_encoder" not in layout.prefixes
    assert layout.config("unet").cross_attention_dim == 1280


def test_bare_unet_file():
    layout = detect_layout(["input_blocks.0.0.weight", "out.2.weight"])
    assert layout.prefixes == {"unet": ""}


def test_not_sdxl():
    with pytest.raises(ValueError, match="not an SDXL single-file checkpoint"):
        detect_layout(["encoder.layer.0.weight"])
