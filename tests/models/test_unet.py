"""UNet parity with diffusers' UNet2DConditionModel (random weights, fp32, CPU).

Tolerance, stated once for every parity test here: max |ours - diffusers| <= 1e-4 * max |diffusers|.
Weights reach our module only through ``load_component``, the import path users run.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet

from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.weights import configs
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.diffusers_io import load_component, save_component
from sdxl_jax.weights.mapping import count_params, param_entries

RTOL = 1e-4

CONFIGS = {
    # SDXL-base shaped: no attention at level 0, deeper stacks further down, 6 time ids.
    "base": UNetConfig.tiny(),
    # Refiner shaped: four levels, attention only in the middle two, 5 time ids (no target size).
    "refiner": UNetConfig.tiny(
        block_out_channels=(16, 32, 32, 48),
        transformer_depth=(0, 2, 2, 0),
        mid_transformer_depth=2,
        num_heads=(2, 2, 4, 4),
        cross_attention_dim=24,
        projection_class_embeddings_input_dim=24 + 5 * 8,
    ),
    # Different ResNet counts per level (diffusers' list form of layers_per_block).
    "uneven": UNetConfig.tiny(layers_per_block=(2, 1, 3), transformer_depth=(0, 1, 2)),
    # An attention-free level between two attention levels, and a mid block depth that differs.
    "gap": UNetConfig.tiny(
        transformer_depth=(1, 0, 3),
        mid_transformer_depth=3,
        num_heads=(4, 2, 2),
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms and biases included (not identity, not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(noise * (1.0 / fan_in**0.5 if p.ndim > 1 else 0.1))


def reference_unet(cfg: UNetConfig, seed: int = 0) -> RefUNet:
    ref = RefUNet.from_config(configs.unet_to_reference(cfg))
    randomize(ref, seed)
    return ref.eval()


def inputs(cfg: UNetConfig, n_ids: int, pooled: int, seed: int = 0, size=(16, 16)):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, cfg.in_channels, *size)).astype(np.float32)
    t = np.array([7.0, 901.0], np.float32)
    ctx = rng.standard_normal((2, 5, cfg.cross_attention_dim)).astype(np.float32)
    text = rng.standard_normal((2, pooled)).astype(np.float32)
    ids = np.array(
        [[1024, 768, 0, 32, 1024, 1024, 6][:n_ids], [64, 96, 16, 0, 64, 64, 2.5][:n_ids]],
        np.float32,
    )
    return sample, t, ctx, text, ids


def run_both(cfg: UNetConfig, tmp_path, n_ids: int, size=(16, 16)):
    pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
    ref = reference_unet(cfg)
    ref.save_pretrained(tmp_path / "unet")
    ours = load_component(tmp_path, "unet")
    sample, t, ctx, text, ids = inputs(cfg, n_ids, pooled, size=size)
    with torch.no_grad():
        want = ref(
            torch.from_numpy(sample),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            added_cond_kwargs={
                "text_embeds": torch.from_numpy(text),
                "time_ids": torch.from_numpy(ids),
            },
        ).sample.numpy()
    got = np.asarray(ours(sample.transpose(0, 2, 3, 1), t, ctx, text, ids)).transpose(0, 3, 1, 2)
    return got, want, ours


@pytest.mark.parametrize("name,n_ids", [("base", 6), ("refiner", 5), ("gap", 6), ("uneven", 6)])
def test_unet_matches_diffusers(name, n_ids, tmp_path):
    cfg = CONFIGS[name]
    got, want, ours = run_both(cfg, tmp_path, n_ids)
    assert ours.config == cfg  # config came from config.json, not from the preset
    scale = np.abs(want).max()
    assert scale > 0.05
    err = np.abs(got - want).max()
    print(f"{name}: max abs error {err:.3g}, scale {scale:.3g}")
    assert err <= RTOL * scale, f"max abs error {err:.3g} vs output scale {scale:.3g}"


def test_latent_sizes_not_divisible_by_the_downsampling_match_diffusers(tmp_path):
    # 13 x 10 latents (a 104 x 80 image): the 3-level UNet downsamples to 7x5 then 4x3, and
    # upsampling must land on the skip sizes, as diffusers' forward_upsample_size does.
    got, want, _ = run_both(CONFIGS["base"], tmp_path, 6, size=(13, 10))
    assert got.shape == want.shape == (2, 4, 13, 10)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_full_size_counts_and_keys_match_diffusers():
    """Built abstractly: exact counts from SPEC.md, and every key and shape equals diffusers'."""
    for cfg, expected in [
        (UNetConfig.sdxl_base(), 2_567_463_684),
        (UNetConfig.sdxl_refiner(), 2_259_526_660),
    ]:
        abstract = COMPONENTS["unet"].abstract(cfg)
        assert count_params(abstract) == expected
        with torch.device("meta"):
            ref = RefUNet.from_config(configs.unet_to_reference(cfg))
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        ours = {
            k: e.ref_shape
            for e in param_entries(abstract, COMPONENTS["unet"].rules)
            for k in e.keys
        }
        assert ours == ref_shapes
        assert sum(p.numel() for p in ref.parameters()) == expected


def test_config_round_trip():
    for cfg in [*CONFIGS.values(), UNetConfig.sdxl_base(), UNetConfig.sdxl_refiner()]:
        assert (
            configs.unet_from_reference(json.loads(json.dumps(configs.unet_to_reference(cfg))))
            == cfg
        )


def test_export_is_bit_exact_and_opens_in_diffusers(tmp_path):
    cfg = CONFIGS["refiner"]
    ref = reference_unet(cfg, seed=3)
    ref.save_pretrained(tmp_path / "a" / "unet")
    ours = load_component(tmp_path / "a", "unet")
    # Export sharded, to exercise the index path too.
    save_component(ours, tmp_path / "b", "unet", max_shard_bytes=200_000)
    assert (tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    again = load_component(tmp_path / "b", "unet")
    from flax import nnx

    a = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))
    # diffusers' own loader reads our export and holds exactly the original weights.
    reopened = RefUNet.from_pretrained(tmp_path / "b" / "unet")
    for (k1, v1), (k2, v2) in zip(
        ref.state_dict().items(), reopened.state_dict().items(), strict=True
    ):
        assert k1 == k2
        assert torch.equal(v1, v2), k1


def test_refiner_weights_into_base_config_name_the_key(tmp_path):
    base, refiner = CONFIGS["base"], CONFIGS["refiner"]
    reference_unet(refiner).save_pretrained(tmp_path / "unet")
    # Force the base config onto refiner weights: the error names a key and both shapes.
    (tmp_path / "unet" / "config.json").write_text(json.dumps(configs.unet_to_reference(base)))
    with pytest.raises(
        ValueError,
        match=r"unet: 'add_embedding.linear_1.bias' has shape \(64,\) in .*expected \(128,\)",
    ):
        load_component(tmp_path, "unet")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = CONFIGS["base"]
    reference_unet(cfg).save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd.pop("mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight")
    save_file(sd, path)
    with pytest.raises(
        ValueError, match="lacks 'mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight'"
    ):
        load_component(tmp_path, "unet")
    sd["mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"] = torch.zeros(
        64, cfg.cross_attention_dim
    )
    sd["extra.weight"] = torch.zeros(3)
    save_file(sd, path)
    with pytest.raises(ValueError, match="holds 'extra.weight'"):
        load_component(tmp_path, "unet")


def test_pickle_checkpoints_are_refused(tmp_path):
    cfg = CONFIGS["base"]
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(configs.unet_to_reference(cfg)))
    torch.save({"x": torch.zeros(1)}, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*can run arbitrary code.*safetensors"):
        load_component(tmp_path, "unet")


def test_unsupported_config_fails_clearly():
    d = configs.unet_to_reference(CONFIGS["base"])
    d["resnet_time_scale_shift"] = "scale_shift"
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift' is not supported"):
        configs.unet_from_reference(d)
