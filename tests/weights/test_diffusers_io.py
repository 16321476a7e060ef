"""diffusers folders as diffusers itself writes them: sharded with an index, fp16 variants."""

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from sdxl_jax.weights.diffusers_io import load_component
from tests.models.test_unet import CONFIGS, reference_unet


def test_sharded_folder_written_by_diffusers(tmp_path):
    ref = reference_unet(CONFIGS["base"], seed=7)
    ref.save_pretrained(tmp_path / "unet", max_shard_size="300KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_component(tmp_path, "unet")
    params = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    kernel = np.asarray(params[("conv_in", "kernel")].get_value())
    np.testing.assert_array_equal(kernel, ref.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_fp16_variant_loads_into_the_asked_dtype(tmp_path):
    ref = reference_unet(CONFIGS["base"], seed=8).half()
    ref.save_pretrained(tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    for param_dtype in (jnp.float32, jnp.bfloat16):
        ours = load_component(tmp_path, "unet", param_dtype=param_dtype)
        params = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
        v = params[("conv_out", "kernel")].get_value()
        assert v.dtype == param_dtype
        want = ref.conv_out.weight.detach().to(torch.float32).numpy().transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(
            np.asarray(v.astype(jnp.float32)), want.astype(param_dtype).astype(np.float32)
        )
