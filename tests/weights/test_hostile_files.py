"""Hostile and broken input: safetensors headers built byte by byte, broken config.json files and
an --to that exists. Each is refused in one line naming the file and what is wrong, with the
``safetensors`` library as the independent judge of which headers are broken; valid files read
back equal to the library's own reading."""

import json
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdxl_jax.convert import main
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.weights import configs, diffusers_io
from sdxl_jax.weights.safetensors_io import SafetensorsFile, TensorSource

DATA = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes: one F32 tensor of shape [4]


def entry(shape=(4,), offsets=(0, 16), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def write_raw(path, header, data, header_len=None):
    """8-byte little-endian header length, the header, the data: exactly as given."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


# name: (header, data, header length (None: the true one), tensor to be named, words of the
# message saying what is wrong)
HOSTILE = {
    "overlapping": (
        {"first": entry(), "second": entry(offsets=(8, 24))},
        DATA + DATA[:8],
        None,
        "second",
        "overlap tensor 'first'",
    ),
    "reversed": ({"first": entry(offsets=(16, 0))}, DATA, None, "first", "reversed"),
    "negative": ({"first": entry(offsets=(-16, 0))}, DATA, None, "first", "non-negative"),
    "past_the_end": (
        {"first": entry(), "second": entry(offsets=(16, 32))},
        DATA,
        None,
        "second",
        "past the end",
    ),
    "size_is_not_numel_x_itemsize": (
        {"first": entry(shape=(3,))},
        DATA,
        None,
        "first",
        "is 12 bytes but data_offsets [0, 16] span 16",
    ),
    "negative_shape": ({"first": entry(shape=(-4,))}, DATA, None, "first", "shape [-4]"),
    "unknown_dtype": ({"first": entry(dtype="F7")}, DATA, None, "first", "unknown dtype 'F7'"),
    "header_is_a_list": ([entry()], DATA, None, None, "JSON list"),
    "entry_without_dtype": (
        {"first": {"shape": [4], "data_offsets": [0, 16]}},
        DATA,
        None,
        "first",
        "no dtype",
    ),
    "header_longer_than_file": ({"first": entry()}, DATA, 10**6, None, "header length 1000000"),
    "bytes_of_no_tensor": (
        {"first": entry(shape=(2,), offsets=(0, 8))},
        DATA,
        None,
        None,
        "belong to no tensor",
    ),
    "metadata_not_strings": (
        {"__metadata__": {"format": 1}, "first": entry()},
        DATA,
        None,
        None,
        "__metadata__",
    ),
}


@pytest.fixture(params=list(HOSTILE))
def hostile(request, tmp_path):
    header, data, n, tensor, words = HOSTILE[request.param]
    return write_raw(tmp_path / f"{request.param}.safetensors", header, data, n), tensor, words


def assert_one_line(message, path, tensor, words):
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert str(path) in message, message
    assert tensor is None or f"tensor {tensor!r}" in message, message
    assert words in message, message


def test_we_refuse_each_as_the_library_does_naming_file_and_tensor(hostile):
    path, tensor, words = hostile
    with pytest.raises(SafetensorError):  # the independent judge: broken
        with safe_open(path, framework="numpy") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(ValueError) as e:
        TensorSource.open(path)
    assert_one_line(str(e.value), path, tensor, words)


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_the_cli_refuses_each_in_one_line(hostile, command, tmp_path):
    path, tensor, words = hostile
    out = tmp_path / "out.safetensors"
    extra = ["--to", str(out), "--format", "single-file"] if command == "export" else []
    run = subprocess.run(
        [sys.executable, "-m", "sdxl_jax.convert", command, str(path), *extra],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""  # no counts printed from impossible shapes
    assert run.stderr.startswith("error: ")
    assert_one_line(run.stderr, path, tensor, words)
    assert not out.exists()


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_valid_files_read_as_the_library_reads_them(tmp_path):
    """bf16, both float8s, zero-size and 0-d tensors, from the library's own writer."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 2, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "e4m3": torch.randn(6, 2, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "empty": torch.zeros(0, 3),
        "also.empty": torch.zeros(2, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "i64": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "valid.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "ok"})
    ours = SafetensorsFile(path)
    with safe_open(path, framework="pt") as ref:
        assert ours.metadata == ref.metadata()
        assert sorted(ours.keys()) == sorted(ref.keys())
        for k in ref.keys():
            want = ref.get_tensor(k)
            got = ours.read(k)
            assert got.shape == tuple(want.shape), k
            assert got.tobytes() == torch_bytes(want), k
    assert ours.read("bf16").dtype == ml_dtypes.bfloat16
    assert ours.read("e4m3").dtype == ml_dtypes.float8_e4m3fn


def test_valid_hand_built_headers_read_as_the_library_reads_them(tmp_path):
    """Entries listed out of offset order, a zero-size tensor sharing an offset, metadata null,
    space padding; and a file holding only metadata."""
    header = {
        "__metadata__": None,
        "late": entry(offsets=(16, 32)),
        "early": entry(),
        "nothing": entry(shape=(0, 4), offsets=(16, 16)),
    }
    blob = json.dumps(header).encode() + b"    "
    path = write_raw(tmp_path / "ordered.safetensors", blob, DATA + DATA[::-1])
    ours = SafetensorsFile(path)
    with safe_open(path, framework="numpy") as ref:
        assert sorted(ours.keys()) == sorted(ref.keys()) and ours.metadata == {}
        for k in ref.keys():
            np.testing.assert_array_equal(ours.read(k), ref.get_tensor(k))
    only_meta = tmp_path / "meta.safetensors"
    save_file({}, only_meta, metadata={"a": "b"})
    with safe_open(only_meta, framework="numpy") as ref:
        assert SafetensorsFile(only_meta).metadata == ref.metadata() == {"a": "b"}
        assert SafetensorsFile(only_meta).keys() == list(ref.keys()) == []


def test_hostile_shard_indexes(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, tmp_path / "s2.safetensors")
    index = tmp_path / "m.safetensors.index.json"
    cases = {
        "{not json": "not a JSON index",
        json.dumps({"weight_map": {"a": "../s1.safetensors"}}): "not a file name beside",
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}): "in both",
        json.dumps({"weight_map": {"b": "s1.safetensors"}}): "does not hold",
        json.dumps([1]): "no weight_map",
    }
    for text, words in cases.items():
        index.write_text(text)
        with pytest.raises(ValueError, match=words) as e:
            TensorSource.open(index)
        assert str(index) in str(e.value) and "\n" not in str(e.value)


# -- config.json ----------------------------------------------------------------------------------

REFERENCE = {
    "unet": lambda: configs.unet_to_reference(UNetConfig.tiny()),
    "vae": lambda: configs.vae_to_reference(VAEConfig.tiny()),
    "text_encoder": lambda: configs.clip_to_reference(CLIPTextConfig.tiny()),
}


@pytest.mark.parametrize(
    "name, change, key",
    [
        ("unet", {"block_out_channels": [32, -64, 64]}, "block_out_channels"),
        ("unet", {"block_out_channels": [32, 64]}, "block_out_channels"),  # 3 down blocks
        ("unet", {"layers_per_block": 0}, "layers_per_block"),
        ("unet", {"attention_head_dim": [2, 0, 4]}, "attention_head_dim"),
        ("unet", {"transformer_layers_per_block": [1, 0, 2]}, "transformer_layers_per_block"),
        ("unet", {"cross_attention_dim": "wide"}, "cross_attention_dim"),
        ("unet", {"norm_eps": -1e-5}, "norm_eps"),
        ("unet", {"norm_num_groups": 0}, "norm_num_groups"),
        ("unet", {"down_block_types": "CrossAttnDownBlock2D"}, "down_block_types"),
        ("vae", {"latent_channels": 0}, "latent_channels"),
        ("vae", {"block_out_channels": []}, "block_out_channels"),
        ("vae", {"latents_mean": [0.0, 1.0]}, "latents_mean"),
        ("vae", {"scaling_factor": 0}, "scaling_factor"),
        ("text_encoder", {"hidden_size": -64}, "hidden_size"),
        ("text_encoder", {"num_hidden_layers": 0}, "num_hidden_layers"),
        ("text_encoder", {"vocab_size": 1.5}, "vocab_size"),
    ],
)
def test_impossible_config_values_name_file_and_key(tmp_path, name, change, key):
    (tmp_path / name).mkdir()
    path = tmp_path / name / "config.json"
    path.write_text(json.dumps({**REFERENCE[name](), **change}))
    with pytest.raises(ValueError) as e:
        diffusers_io.read_config(tmp_path, name)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and key in message and "\n" not in message, message


@pytest.mark.parametrize(
    "text, words",
    [("{not json", "not a JSON file"), (b"\xff\xfe", "not a JSON file"), ("[1, 2]", "JSON list")],
)
def test_config_json_that_is_not_an_object(tmp_path, capsys, text, words):
    (tmp_path / "unet").mkdir()
    path = tmp_path / "unet" / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), "--to", str(out), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_impossible_unet_config_in_one_line(tmp_path):
    """A negative width, which diffusers' own UNet cannot be built with either."""
    from diffusers import UNet2DConditionModel

    (tmp_path / "unet").mkdir()
    d = {**REFERENCE["unet"](), "block_out_channels": [32, -64, 64]}
    with pytest.raises(RuntimeError), torch.device("meta"):
        UNet2DConditionModel.from_config(d)
    (tmp_path / "unet" / "config.json").write_text(json.dumps(d))
    run = subprocess.run(
        [sys.executable, "-m", "sdxl_jax.convert", "export", str(tmp_path), "--to",
         str(tmp_path / "out"), "--format", "diffusers"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert str(tmp_path / "unet" / "config.json") in run.stderr
    assert "block_out_channels" in run.stderr


# -- --to -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_export_to_an_existing_file_is_refused_before_loading(tmp_path, capsys, fmt):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"precious")
    source = tmp_path / "missing.safetensors"  # loading it would fail differently
    assert main(["export", str(source), "--to", str(taken), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert f"--to {taken} exists" in err and "nothing is overwritten" in err, err
    assert taken.read_bytes() == b"precious"


def test_export_into_a_folder_that_is_not_empty_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", str(tmp_path / "missing"), "--to", str(out), "--format", "diffusers"])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
