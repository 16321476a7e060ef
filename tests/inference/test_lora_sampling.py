"""LoRA files against diffusers, image for image: ours written in kohya and PEFT formats and
loaded by ``pipe.load_lora_weights`` (UNet and both text encoders, with a scale) give the images
``generate(loras=...)`` gives; a PEFT LoRA made by diffusers' own tools (and its kohya
conversion) loads here with diffusers' images; a LoRA for the refiner is refused by the base
naming a module and both shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from flax import nnx

from sdxl_jax.inference import checkpoints, generate
from sdxl_jax.inference import loras as loras_lib
from sdxl_jax.models import lora
from sdxl_jax.weights import lora_files
from tests.diffusion import tiny_pipelines as ref
from tests.inference.test_generate import PROMPTS, H, W, _assert_same, _noise

STEPS, GUIDANCE, SCALE = 6, 5.0, 0.7
GROUPS = {"unet": ("attn", "ff", "conv"), "te1": ("attn", "mlp"), "te2": ("attn", "mlp")}


def random_adapters(models, seed=0, rank=3, alpha=6.0):
    """Random nonzero adapters on each model's GROUPS layers, one per layer of a stack."""
    r = np.random.default_rng(seed)
    out = {}
    for component, model in models.items():
        per = {}
        for path, node in lora.find_targets(model, GROUPS[component]):
            shape = node.kernel.get_value().shape
            stacked = len(shape) in (3, 5)
            kernel = shape[1:] if stacked else shape
            for layer in range(shape[0]) if stacked else [None]:
                fan_in = int(np.prod(kernel[:-1]))
                down = r.standard_normal((*kernel[:-1], rank)) / np.sqrt(fan_in)
                up = 0.5 * r.standard_normal((rank, kernel[-1])) / np.sqrt(rank)
                per[(path, layer)] = lora.Adapter(down.astype(np.float32),
                                                  up.astype(np.float32), alpha)  # fmt: skip
        out[component] = per
    return out


def diffusers_images(folder, lora_path, scale, noise, **load_kw):
    pipe = ref._load(StableDiffusionXLPipeline, folder, "euler")
    pipe.load_lora_weights(str(lora_path), **load_kw)
    with torch.no_grad():
        return pipe(
            prompt=PROMPTS, latents=torch.from_numpy(noise), num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, height=H, width=W, output_type="np",
            cross_attention_kwargs={"scale": scale},
        ).images  # fmt: skip


def ours(folder, lora_path, scale, noise):
    return generate.generate(
        PROMPTS, folder, loras=[(lora_path, scale)], steps=STEPS, guidance=GUIDANCE,
        sampler="euler", height=H, width=W, noise=noise,
    ).images  # fmt: skip


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_our_lora_files_load_in_diffusers_with_the_same_images(tiny_sdxl, tmp_path, fmt):
    base, _ = tiny_sdxl
    models = loras_lib.abstract_models(checkpoints.check_stage(base))
    adapters = random_adapters(models)
    path = lora_files.save(tmp_path / ("lora.safetensors" if fmt == "kohya" else "peft"),
                           adapters, models, format=fmt, dtype="fp32")  # fmt: skip
    keys = lora_files.open_lora(path).keys()
    if fmt == "kohya":  # kohya's SDXL names (sgm blocks), never PEFT's
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in keys or any(
            k.startswith("lora_unet_input_blocks_") for k in keys
        )
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn") for k in keys)
        assert not any(".lora_A." in k for k in keys)
    else:
        assert any(k.startswith("unet.down_blocks.") and k.endswith(".lora_A.weight") for k in keys)
        assert not any(k.startswith("lora_") for k in keys)
    # Read back: the same adapters.
    back = lora_files.load(path, models)
    for component, per in adapters.items():
        assert set(back.adapters[component]) == set(per)
        for target, a in per.items():
            np.testing.assert_allclose(back.adapters[component][target].delta(), a.delta(),
                                       rtol=1e-5, atol=1e-7)  # fmt: skip
    noise = _noise(len(PROMPTS), seed=3)
    want = diffusers_images(base, path, SCALE, noise)
    got = ours(base, path, SCALE, noise)
    _assert_same(got, want)
    plain = generate.generate(PROMPTS, base, steps=STEPS, guidance=GUIDANCE, sampler="euler",
                              height=H, width=W, noise=noise).images  # fmt: skip
    assert np.abs(plain.astype(float) - got).mean() > 2  # the LoRA changed the images


@pytest.mark.slow(seconds=90)
def test_a_diffusers_peft_lora_and_its_kohya_conversion_load_here(tiny_sdxl, tmp_path):
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    base, _ = tiny_sdxl
    pipe = ref._load(StableDiffusionXLPipeline, base, "euler")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=targets,
                                     init_lora_weights="gaussian"))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    unet_sd = get_peft_model_state_dict(pipe.unet)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=unet_sd,
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
    )  # fmt: skip
    peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    kohya_sd = convert_state_dict_to_kohya(
        convert_all_state_dict_to_peft({f"unet.{k}": v for k, v in unet_sd.items()})
    )
    kohya_file = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya_sd.items()}, kohya_file)

    noise = _noise(len(PROMPTS), seed=5)
    # diffusers' kohya conversion writes alpha = rank (it drops PEFT's lora_alpha): each file is
    # compared with diffusers loading that same file.
    for path, alpha in ((peft_file, 2.0), (kohya_file, 4.0)):
        loaded = lora_files.load(path, loras_lib.abstract_models(checkpoints.check_stage(base)))
        assert set(loaded.adapters) == {"unet"} and not loaded.skipped
        assert {a.alpha for a in loaded.adapters["unet"].values()} == {alpha}
        _assert_same(ours(base, path, 1.0, noise), diffusers_images(base, path, 1.0, noise))


def test_bad_loras_are_refused_before_sampling(tiny_sdxl, tmp_path, capsys):
    base, refiner = tiny_sdxl
    ref_models = loras_lib.abstract_models(checkpoints.check_stage(refiner))
    adapters = random_adapters({"unet": ref_models["unet"]})
    path = lora_files.save(tmp_path / "refiner.safetensors", adapters,
                           {"unet": ref_models["unet"]}, format="kohya")  # fmt: skip
    # Names shared with the base come first: the first that does not fit, with both shapes
    # (the refiner's cross-attention reads text_encoder_2 only: 64 wide, the base's 32 + 64).
    with pytest.raises(generate.UsageError, match=r"attn2_to_k does not fit the model: its "
                       r"layer \S+ is \[64, 96\] \(out, in.*down is \[3, 64\]"):  # fmt: skip
        generate.check_models(base, loras=[(path, 1.0)])
    # The refiner takes it when given: each LoRA goes to the stage it fits.
    models = generate.check_models(base, refiner=refiner, loras=[(path, 1.0)])
    assert [lo.stage for lo in models.loras] == ["refiner"]
    # Unknown keys: strict refuses and lists them; non-strict skips and counts them.
    good = random_adapters(
        {"unet": loras_lib.abstract_models(checkpoints.check_stage(base))["unet"]}
    )
    keys = {"lora_unet_not_a_layer.lora_down.weight": np.zeros((2, 4), np.float16),
            "lora_unet_not_a_layer.lora_up.weight": np.zeros((4, 2), np.float16)}  # fmt: skip
    from safetensors.numpy import save_file

    mixed = tmp_path / "mixed.safetensors"
    base_models = loras_lib.abstract_models(checkpoints.check_stage(base))
    lora_files.save(mixed, good, {"unet": base_models["unet"]}, format="kohya")
    from safetensors.numpy import load_file

    save_file({**load_file(mixed), **keys}, mixed)
    with pytest.raises(generate.UsageError, match="lora_unet_not_a_layer"):
        generate.check_models(base, loras=[(mixed, 1.0)])
    loose = generate.check_models(base, loras=[(mixed, 1.0)], lora_strict=False)
    assert loose.loras[0].loaded.skipped == ["lora_unet_not_a_layer"]
    # The CLI says what it skipped, before anything loads (here the missing init image stops it).
    from sdxl_jax import sample

    assert sample.main(["--checkpoint", str(base), "--lora", str(mixed), "--no-lora-strict",
                        "--prompt", "x", "--init-image", str(tmp_path / "none.png"),
                        "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "warning: LoRA mixed.safetensors: skipped 1 module(s) that match no layer of the base "
        "(['lora_unet_not_a_layer'])"
    )
    assert "none.png does not exist" in err[1]
    # Pickles are never unpickled.
    pickle = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(generate.UsageError, match="pickle"):
        generate.check_models(base, loras=[(pickle, 1.0)])
    # A rank larger than the layer.
    with pytest.raises(ValueError, match="larger than the layer"):
        lora.attach(nnx.eval_shape(lambda: type(base_models["unet"])(
            base_models["unet"].config, rngs=nnx.Rngs(0))), lora.LoRAConfig(rank=10_000),
            nnx.Rngs(0))  # fmt: skip


def test_an_sd15_lora_is_refused_naming_a_module_and_both_shapes(tiny_sdxl, tmp_path):
    """A kohya LoRA made by diffusers + PEFT for an SD 1.5-shaped UNet (attention in every down
    block, one 24-wide text encoder) is refused by the SDXL base before anything loads."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    sd15 = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=8,
        cross_attention_dim=24, norm_num_groups=8,
    )  # fmt: skip
    sd15.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    kohya = convert_state_dict_to_kohya(
        convert_all_state_dict_to_peft(
            {f"unet.{k}": v for k, v in get_peft_model_state_dict(sd15).items()}
        )
    )
    path = tmp_path / "sd15.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    base, _ = tiny_sdxl
    with pytest.raises(generate.UsageError) as e:
        generate.check_models(base, loras=[(path, 1.0)])
    msg = str(e.value)
    assert "\n" not in msg and "SD 1.5" in msg
    assert "attn2_to_k does not fit the model" in msg and "[64, 96]" in msg and "[4, 24]" in msg
    # Skipping the names the base lacks does not let a misshapen one through.
    with pytest.raises(generate.UsageError, match="does not fit the model"):
        generate.check_models(base, loras=[(path, 1.0)], lora_strict=False)


@pytest.mark.slow(seconds=60)
def test_sample_cli_lora_equals_merge_lora_checkpoint(tiny_sdxl, tmp_path):
    """``sample --lora F:S`` and ``convert merge-lora`` then ``sample`` give the same images
    (the merge is the same arithmetic; the manifest records the LoRA)."""
    import json

    from sdxl_jax import convert, sample

    base, _ = tiny_sdxl
    models = loras_lib.abstract_models(checkpoints.check_stage(base))
    path = lora_files.save(tmp_path / "l.safetensors", random_adapters(models, seed=2), models)
    common = ["--prompt", PROMPTS[0], "--steps", "4", "--height", str(H), "--width", str(W),
              "--sampler", "euler", "--no-grid"]  # fmt: skip
    assert sample.main(["--checkpoint", str(base), "--lora", f"{path}:0.5", "--out",
                        str(tmp_path / "a"), *common]) == 0  # fmt: skip
    merged = tmp_path / "merged"
    assert convert.main(["merge-lora", str(base), "--lora", f"{path}:0.5", "--to",
                         str(merged)]) == 0  # fmt: skip
    assert convert.main(["merge-lora", str(base), "--lora", str(path), "--to",
                         str(merged)]) == 2  # an existing --to is refused  # fmt: skip
    assert sample.main(["--checkpoint", str(merged), "--out", str(tmp_path / "b"), *common]) == 0
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "a" / "00000.png"), np.float32)
    b = np.asarray(Image.open(tmp_path / "b" / "00000.png"), np.float32)
    assert np.abs(a - b).mean() <= 0.5  # rounding of the saved fp32 weights only
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["settings"]["loras"][0]["scale"] == 0.5
