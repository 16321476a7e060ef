"""The VAE's sgm key mapping against diffusers' own single-file converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.weights import configs
from sdxl_jax.weights.sgm_vae import sgm_name

PREFIX = "first_stage_model."


def to_sgm(state_dict: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        t = sgm_name(k, config)
        assert PREFIX + t.key not in out, f"{k} collides with another key at {t.key}"
        out[PREFIX + t.key] = v[:, :, None, None] if t.squeeze else v
    return out


@pytest.mark.parametrize("levels", [2, 3])
def test_diffusers_converter_inverts_our_mapping(levels):
    config = VAEConfig(
        block_out_channels=(16, 32, 32)[:levels], layers_per_block=2, norm_num_groups=8
    )
    torch.manual_seed(0)
    ref = TorchAutoencoderKL.from_config(configs.vae_to_reference(config))
    state = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}  # every tensor distinct
    sgm = to_sgm(state, config)
    assert any(t.shape[-2:] == (1, 1) for k, t in sgm.items() if ".attn_1.q." in k)
    back = convert_ldm_vae_checkpoint(sgm, dict(ref.config))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_mapping_is_injective_on_the_sdxl_vae():
    config = VAEConfig.sdxl()
    with torch.device("meta"):
        ref = TorchAutoencoderKL.from_config(configs.vae_to_reference(config))
    names = [sgm_name(k, config).key for k in ref.state_dict()]
    assert len(names) == len(set(names)) == 248
    assert sgm_name("decoder.up_blocks.0.resnets.1.conv1.weight", config).key == (
        "decoder.up.3.block.1.conv1.weight"
    )
    assert sgm_name("encoder.mid_block.attentions.0.to_out.0.weight", config).squeeze


@pytest.mark.parametrize(
    "key",
    [
        "encoder.down_blocks.3.downsamplers.0.conv.weight",  # the last level has no downsampler
        "decoder.up_blocks.3.upsamplers.0.conv.weight",
        "encoder.down_blocks.0.resnets.2.conv1.weight",  # the encoder has 2 ResNets per level
        "decoder.up_blocks.4.resnets.0.conv1.weight",
        "encoder.mid_block.resnets.2.conv1.weight",
        "encoder.mid_block.attentions.0.to_out.1.weight",
        "decoder.conv_in.running_mean",
        "text_model.embeddings.position_ids",
    ],
)
def test_unmappable_keys_raise(key):
    with pytest.raises(KeyError, match="no sgm name"):
        sgm_name(key, VAEConfig.sdxl())
