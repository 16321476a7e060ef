"""The single-file UNet key mapping, checked against diffusers' own sgm -> diffusers converter."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.weights import configs
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.mapping import param_entries
from sdxl_jax.weights.sgm_unet import sgm_name
from sdxl_jax.weights.single_file import load_single_file, save_single_file
from tests.models.test_unet import CONFIGS, inputs, reference_unet


@pytest.mark.parametrize("name", ["base", "refiner", "gap"])
def test_diffusers_converter_inverts_our_mapping(name):
    cfg = CONFIGS[name]
    ref = RefUNet.from_config(configs.unet_to_reference(cfg))
    sd = ref.state_dict()
    sgm = {"model.diffusion_model." + sgm_name(k, cfg).key: v for k, v in sd.items()}
    assert len(sgm) == len(sd)  # injective
    back = convert_ldm_unet_checkpoint(sgm, configs.unet_to_reference(cfg))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_mapping_is_injective_at_full_size():
    for cfg in [UNetConfig.sdxl_base(), UNetConfig.sdxl_refiner()]:
        abstract = COMPONENTS["unet"].abstract(cfg)
        keys = [k for e in param_entries(abstract, COMPONENTS["unet"].rules) for k in e.keys]
        names = {sgm_name(k, cfg).key for k in keys}
        assert len(names) == len(keys)
        # Landmarks of the real sgm layouts.
        assert "label_emb.0.0.weight" in names and "out.2.weight" in names
        if cfg == UNetConfig.sdxl_base():
            assert "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight" in names
            assert "output_blocks.2.2.conv.weight" in names
            assert "input_blocks.6.0.op.weight" in names
        else:
            assert "input_blocks.9.0.op.weight" in names  # level 2's downsampler
            assert "output_blocks.2.1.conv.weight" in names  # no attention at level 3


@pytest.mark.parametrize("name", ["refiner", "uneven"])
def test_single_file_round_trip_and_parity(name, tmp_path):
    """diffusers folder -> our modules -> single file -> our modules: bit-exact, same outputs."""
    cfg = CONFIGS[name]
    ref = reference_unet(cfg, seed=5)
    path = tmp_path / "unet_only.safetensors"
    # The sgm numbering of an uneven UNet, as sgm's own model builds it: per level its ResNet
    # blocks then the downsampler; decoder levels deepest first with one block more.
    if name == "uneven":
        names = {sgm_name(k, cfg).key for k in ref.state_dict()}
        assert "input_blocks.3.0.op.weight" in names  # level 0: blocks 1-2, downsampler 3
        assert "input_blocks.5.0.op.weight" in names  # level 1: block 4, downsampler 5
        assert "input_blocks.8.1.proj_in.weight" in names  # level 2: blocks 6-8
        assert "output_blocks.3.2.conv.weight" in names  # deepest level: 4 blocks, 0-3
        assert "output_blocks.5.2.conv.weight" in names  # level 1: 2 blocks, 4-5
        assert "output_blocks.8.0.in_layers.0.weight" in names  # level 0: 3 blocks, 6-8
    from sdxl_jax.weights.diffusers_io import load_component

    ref.save_pretrained(tmp_path / "d" / "unet")
    ours = load_component(tmp_path / "d", "unet")
    save_single_file({"unet": ours}, path)
    again = load_single_file(path, configs={"unet": cfg})["unet"]
    n_ids = 5 if name == "refiner" else 6
    pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
    sample, t, ctx, text, ids = inputs(cfg, n_ids, pooled)
    a = np.asarray(ours(sample.transpose(0, 2, 3, 1), t, ctx, text, ids))
    b = np.asarray(again(sample.transpose(0, 2, 3, 1), t, ctx, text, ids))
    np.testing.assert_array_equal(a, b)
