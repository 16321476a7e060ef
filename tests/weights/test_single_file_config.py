"""Our single files store their configs (``__metadata__["sdxl_jax.config"]``), so models of
shapes other than SDXL's round-trip; files from elsewhere keep the SDXL presets."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl_jax.convert import main
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.weights import formats
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.loader import export_tensors
from sdxl_jax.weights.safetensors_io import TensorSource
from sdxl_jax.weights.single_file import CONFIG_KEY, detect_layout

CONFIGS = {
    "unet": UNetConfig.tiny(layers_per_block=(2, 1, 3)),
    "vae": VAEConfig(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
        latents_mean=(0.1, -0.2, 0.3, 0.0),
        latents_std=(1.0, 2.0, 0.5, 4.0),
    ),
    "text_encoder": CLIPTextConfig.tiny(),
    "text_encoder_2": CLIPTextConfig.tiny_bigg(),
}


def random_module(name, config, seed):
    """Every tensor random (filled into the abstract module: no eager init to compile)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(COMPONENTS[name].abstract(config))
    flat = [
        (path, var.replace(jnp.asarray(rng.standard_normal(var.shape), jnp.float32)))
        for path, var in nnx.to_flat_state(state)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def params(module):
    return {
        k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].config == b[name].config, name
        pa, pb = params(a[name]), params(b[name])
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{name} {k}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    models = {n: random_module(n, c, i) for i, (n, c) in enumerate(CONFIGS.items())}
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    formats.save(models, path, "single-file")
    return models, path


def test_our_single_file_round_trips_weights_and_configs(exported, tmp_path, capsys):
    models, path = exported
    assert_same(models, formats.load(path))
    # Through the CLI, to a diffusers folder and back to a single file.
    folder, again = tmp_path / "folder", tmp_path / "again.safetensors"
    assert main(["export", str(path), "--to", str(folder), "--format", "diffusers"]) == 0
    assert main(["export", str(folder), "--to", str(again), "--format", "single-file"]) == 0
    assert_same(models, formats.load(folder))
    assert_same(models, formats.load(again))
    capsys.readouterr()
    assert main(["inspect", str(again), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {c["config"] for c in info["components"].values()} == {"stored in the file"}


def test_the_stored_configs_are_what_diffusers_and_transformers_build(exported):
    """The metadata holds reference config.json dicts: the reference classes built from them
    have exactly the tensors (names and shapes) our modules export."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models, path = exported
    with safe_open(path, framework="numpy") as f:
        stored = json.loads(f.metadata()[CONFIG_KEY])
    assert set(stored) == set(CONFIGS)
    with torch.device("meta"):
        refs = {
            "unet": UNet2DConditionModel.from_config(stored["unet"]),
            "vae": AutoencoderKL.from_config(stored["vae"]),
            "text_encoder": CLIPTextModel(HFConfig(**stored["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(HFConfig(**stored["text_encoder_2"])),
        }

    def shapes(tensors):  # transformers 5's state_dict drops the text_model. its files have
        return {
            k.removeprefix("text_model."): tuple(v.shape)
            for k, v in tensors.items()
            if not k.endswith("position_ids")
        }

    for name, ref in refs.items():
        ours = export_tensors(models[name], COMPONENTS[name].rules, None)
        assert shapes(ours) == shapes(ref.state_dict()), name


def test_files_from_elsewhere_keep_the_sdxl_presets(tmp_path, capsys):
    path = tmp_path / "foreign.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.bias": torch.zeros(320)}, path)
    source = TensorSource.open(path)
    layout = detect_layout(source.keys(), source)
    assert layout.stored == {} and layout.config("unet") == UNetConfig.sdxl_base()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["components"]["unet"]["config"] == "SDXL preset"


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: "{not json", "is not JSON"),
        (lambda s: json.dumps({**s, "controlnet": {}}), "not an object of"),
        (
            lambda s: json.dumps({**s, "unet": {**s["unet"], "block_out_channels": [32, -64, 64]}}),
            "unet: block_out_channels=[32, -64, 64]",
        ),
    ],
)
def test_a_broken_stored_config_is_refused_in_one_line(exported, tmp_path, capsys, edit, words):
    _, path = exported
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    meta[CONFIG_KEY] = edit(json.loads(meta[CONFIG_KEY]))
    broken = tmp_path / "broken.safetensors"
    save_file(load_file(path), broken, metadata=meta)
    with pytest.raises(ValueError, match="sdxl_jax.config") as e:
        formats.load(broken)
    assert str(broken) in str(e.value) and words in str(e.value), e.value
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_explicit_configs_still_win(exported):
    models, path = exported
    from sdxl_jax.weights.single_file import load_single_file

    with pytest.raises(ValueError):  # SDXL's shapes are not in this file
        load_single_file(path, ["vae"], configs={"vae": VAEConfig.sdxl()})
    assert_same({"vae": models["vae"]}, load_single_file(path, ["vae"]))


def test_a_parameter_stored_as_integers_is_refused(exported, tmp_path):
    """The header is valid, the shape right, but a cast to float would invent the values."""
    _, path = exported
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = "first_stage_model.decoder.conv_out.bias"
    tensors[key] = torch.arange(tensors[key].numel(), dtype=torch.int32)
    bad = tmp_path / "ints.safetensors"
    save_file(tensors, bad, metadata=meta)
    with pytest.raises(ValueError, match=f"'decoder.conv_out.bias' is int32 in {bad}"):
        formats.load(bad, ["vae"])
