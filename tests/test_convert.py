"""The convert command: exact preset counts, and a whole tiny pipeline through both formats."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from flax import nnx
from transformers import CLIPTextConfig as HFCLIPConfig
from transformers import CLIPTextModel as HFCLIP
from transformers import CLIPTextModelWithProjection as HFCLIPProj

from sdxl_jax.convert import main
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.weights import configs, formats
from tests.models.test_unet import CONFIGS, randomize, reference_unet

# SPEC.md's table, checked there against the diffusers / transformers modules.
SPEC_COUNTS = {
    "sdxl_base": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "sdxl_refiner": {"unet": 2_259_526_660, "vae": 83_653_863, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("preset", ["sdxl_base", "sdxl_refiner"])
def test_inspect_preset_prints_exact_counts(preset):
    out = subprocess.run(
        [sys.executable, "-m", "sdxl_jax.convert", "inspect", "--preset", preset],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for comp, n in SPEC_COUNTS[preset].items():
        line = next(line for line in out.splitlines() if line.startswith(comp + " "))
        assert str(n) in line.split(), line


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A tiny SDXL-shaped pipeline saved by diffusers and transformers themselves."""
    root = tmp_path_factory.mktemp("pipe")
    reference_unet(CONFIGS["base"], seed=1).save_pretrained(root / "unet")
    vae = RefVAE.from_config(configs.vae_to_reference(VAEConfig.tiny()))
    randomize(vae, 2)
    vae.save_pretrained(root / "vae")
    torch.manual_seed(0)
    HFCLIP(HFCLIPConfig(**configs.clip_to_reference(CLIPTextConfig.tiny()))).save_pretrained(
        root / "text_encoder"
    )
    HFCLIPProj(
        HFCLIPConfig(**configs.clip_to_reference(CLIPTextConfig.tiny_bigg()))
    ).save_pretrained(root / "text_encoder_2")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    return root


def params(module):
    return {
        k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def test_export_round_trip_through_both_formats(tiny_pipeline, tmp_path, capsys):
    single = tmp_path / "tiny.safetensors"
    assert main(["export", str(tiny_pipeline), "--to", str(single), "--format", "single-file"]) == 0
    assert main(["inspect", str(single), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "single-file" and info["model"] == "SDXL base"
    assert set(info["components"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}

    original = formats.load(tiny_pipeline)
    configs = {k: m.config for k, m in original.items()}
    from sdxl_jax.weights.single_file import load_single_file

    reloaded = load_single_file(single, configs=configs)
    out = tmp_path / "diffusers"
    formats.save(reloaded, out, "diffusers", max_shard_bytes=100_000, copy_from=tiny_pipeline)
    again = formats.load(out)
    assert (out / "tokenizer" / "vocab.json").exists()
    for name in original:
        a, b = params(original[name]), params(again[name])
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
        # The header-only parameter count agrees with the module's.
        assert info["components"][name]["parameters"] >= sum(v.size for v in a.values())


def test_export_to_fp16_casts(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "half"
    assert (
        main(
            [
                "export",
                str(tiny_pipeline),
                "--to",
                str(out),
                "--format",
                "diffusers",
                "--dtype",
                "fp16",
                "--components",
                "unet,vae",
            ]
        )
        == 0
    )
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["components"]) == {"unet", "vae"}
    assert set(info["components"]["unet"]["dtypes"]) == {"float16"}


def test_bad_paths_fail_clearly(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    assert main(["inspect", str(ckpt)]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a diffusers checkpoint" in capsys.readouterr().err


def test_export_to_a_bucket_is_refused(tiny_pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["export", str(tiny_pipeline), "--to", "gs://bucket/out", "--format", "diffusers"])
    assert rc == 2
    assert "writes a local folder" in capsys.readouterr().err
    assert not (tmp_path / "gs:").exists()  # not a folder named after the URL
