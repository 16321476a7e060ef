"""The VAE against diffusers' ``AutoencoderKL``.

Parity criterion, fp32: relative error at most 1e-4 of the output's scale, i.e.
``max|ours - ref| <= 1e-4 * max|ref|``, for the posterior mean, logvar and the decoded image.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from sdxl_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    from_diffusion_latents,
    to_diffusion_latents,
)
from sdxl_jax.weights import configs
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.diffusers_io import load_component, save_component
from sdxl_jax.weights.mapping import VAE_RULES, count_params, param_entries

RTOL = 1e-4
# Same structure as SDXL's VAE at a small size: three levels, a channel change (shortcut convs),
# two ResNets per level (three in the decoder), down/upsamplers, mid-block attention.
TINY = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    scaling_factor=0.13025,
)
FLAGS_OFF = dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
SDXL = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=1024,
    scaling_factor=0.13025,
)
# stabilityai/sdxl-vae's config.json, as published (written by an older diffusers: keys missing).
SDXL_VAE_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.18.0.dev0",
    "_name_or_path": "./vae",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def torch_vae(seed: int = 0, **overrides) -> TorchAutoencoderKL:
    """A diffusers VAE with every tensor random, norms and biases included."""
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases around 0, norm scales around 1
                offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(torch.randn_like(p) * 0.1 + offset)
    return model


def random_vae(config: VAEConfig, seed: int) -> AutoencoderKL:
    """Our VAE with every tensor random, norms and biases included.

    Filled from numpy into the abstract module: eager ``nnx`` init compiles one initializer per
    shape and takes seconds.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(COMPONENTS["vae"].abstract(config))
    flat = []
    for path, var in nnx.to_flat_state(state):
        if len(var.shape) == 1:  # biases around 0, norm scales around 1
            value = rng.standard_normal(var.shape) * 0.1 + (path[-1] == "scale")
        else:  # kernels [..., in, out]: unit-variance activations
            value = rng.standard_normal(var.shape) / np.sqrt(np.prod(var.shape[:-1]))
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(ours, ref, what: str) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    rel = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    print(f"{what}: max relative error {rel:.2e}")
    assert rel <= RTOL, f"{what}: max|ours - ref| / max|ref| = {rel:.2e} > {RTOL:.0e}"
    return rel


def compare(ours: AutoencoderKL, ref: TorchAutoencoderKL, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)  # non-square: catches H/W mixups
    z = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(image))).latent_dist
        ref_dec = ref.decode(torch.from_numpy(nchw(z))).sample
        ref_rec = ref(torch.from_numpy(nchw(image))).sample
    mean, logvar = jax.jit(lambda m, x: m.encode(x))(ours, jnp.asarray(image))
    assert_close(mean, nhwc(dist.mean), "encode mean")
    assert_close(logvar, nhwc(dist.logvar), "encode logvar")
    assert_close(jax.jit(lambda m, z: m.decode(z))(ours, jnp.asarray(z)), nhwc(ref_dec), "decode")
    assert_close(jax.jit(lambda m, x: m(x))(ours, jnp.asarray(image)), nhwc(ref_rec), "reconstruct")


@pytest.mark.parametrize("flags", [{}, FLAGS_OFF], ids=["sdxl-like", "flags-off"])
def test_parity_with_diffusers(tmp_path, flags):
    ref = torch_vae(**flags)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_component(tmp_path, "vae")
    assert ours.config == VAEConfig(**{**dataclasses.asdict(VAEConfig.tiny()), **flags})
    compare(ours, ref)


def test_diffusers_loads_our_export(tmp_path):
    ours = random_vae(VAEConfig.tiny(), seed=1)
    save_component(ours, tmp_path, "vae")
    ref = TorchAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    compare(ours, ref, seed=2)


def test_sdxl_parameter_count():
    assert count_params(COMPONENTS["vae"].abstract(VAEConfig.sdxl())) == 83_653_863


def reference_keys(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    return {
        k: e.ref_shape
        for e in param_entries(COMPONENTS["vae"].abstract(config), VAE_RULES)
        for k in e.keys
    }


@pytest.mark.parametrize(
    "ours, theirs", [(VAEConfig.tiny(), TINY), (VAEConfig.sdxl(), SDXL)], ids=["tiny", "sdxl"]
)
def test_reference_keys_and_shapes_match_diffusers(ours, theirs):
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**theirs)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert reference_keys(ours) == expected


def test_save_load_round_trip_is_bit_exact(tmp_path):
    ours = random_vae(VAEConfig.tiny(), seed=3)
    save_component(ours, tmp_path, "vae")
    back = load_component(tmp_path, "vae")
    assert back.config == ours.config
    a = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(
            np.asarray(a[path].get_value()), np.asarray(b[path].get_value())
        )


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig.sdxl(),
        VAEConfig.tiny(),
        VAEConfig(
            latents_mean=(0.1,) * 4,
            latents_std=(2.0,) * 4,
            shift_factor=0.5,
            sample_size=(512, 768),
        ),
    ],
)
def test_config_round_trip(config):
    d = configs.vae_to_reference(config)
    assert configs.vae_from_reference(d) == config
    # diffusers accepts the dict and reads back the same settings.
    with torch.device("meta"):
        ref = TorchAutoencoderKL.from_config(d)
    assert configs.vae_from_reference(dict(ref.config)) == config


def test_published_sdxl_config_is_the_sdxl_preset():
    assert configs.vae_from_reference(SDXL_VAE_JSON) == VAEConfig.sdxl()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"act_fn": "gelu"}, "act_fn"),
        (
            {"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]},
            "down_block_types",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
        ({"norm_type": "spatial"}, "norm_type"),
        ({"norm_num_groups": 48}, "norm_num_groups"),
    ],
)
def test_rejects_what_is_not_implemented(change, message):
    with pytest.raises(ValueError, match=message):
        configs.vae_from_reference({**SDXL_VAE_JSON, **change})


def test_latent_scaling_follows_diffusers_pipelines():
    z = np.random.default_rng(0).standard_normal((1, 2, 2, 4)).astype(np.float32)
    # SDXL pipeline: latents = z * scaling_factor (no latents_mean / latents_std in its config).
    sdxl = VAEConfig.sdxl()
    np.testing.assert_allclose(to_diffusion_latents(z, sdxl), z * 0.13025, rtol=1e-6)
    # With per-channel statistics: (z - mean) * scaling_factor / std, per channel (last axis).
    mean, std = (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 4.0)
    cfg = dataclasses.replace(sdxl, latents_mean=mean, latents_std=std)
    expected = (z - np.array(mean)) * 0.13025 / np.array(std)
    np.testing.assert_allclose(to_diffusion_latents(z, cfg), expected, rtol=1e-5)
    for c in (sdxl, cfg, dataclasses.replace(sdxl, shift_factor=0.1159, scaling_factor=0.3611)):
        np.testing.assert_allclose(
            from_diffusion_latents(to_diffusion_latents(z, c), c), z, atol=1e-5
        )
