"""Our streaming safetensors reader/writer against the safetensors library itself."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.torch import load_file, save_file

from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.loader import load_module
from sdxl_jax.weights.safetensors_io import TensorSource, spec_of, write_sharded


def test_read_what_safetensors_wrote(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b.bf16": torch.randn(4, 2).to(torch.bfloat16),
        "c.half": torch.randn(7).half(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    src = TensorSource.open(tmp_path / "x.safetensors")
    assert sorted(src.keys()) == sorted(tensors)
    for k, t in tensors.items():
        got = src.read(k)
        assert got.shape == tuple(t.shape)
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        np.testing.assert_array_equal(got.astype(want.dtype), want)
    assert src.read("b.bf16").dtype == ml_dtypes.bfloat16


def test_safetensors_reads_what_we_wrote_sharded(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"w{i}": rng.standard_normal((i + 1, 64)).astype(np.float32) for i in range(6)}
    arrays["h"] = rng.standard_normal((3, 3)).astype(ml_dtypes.bfloat16)
    names = write_sharded(tmp_path, "model", {k: spec_of(v) for k, v in arrays.items()}, 1024)
    assert len(names) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    back = {}
    for name in names:
        back.update(load_file(tmp_path / name))
    assert set(index["weight_map"]) == set(arrays) == set(back)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k].float().numpy(), v.astype(np.float32))


def test_float8_bf16_and_metadata_match_safetensors(tmp_path):
    """Every dtype we write reads back bit-exact, through safetensors itself and through us
    (float8, which safe_open's numpy reader lacks, included); header-only info and metadata."""
    rng = np.random.default_rng(1)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "e4m3": rng.standard_normal((4, 3)).astype(ml_dtypes.float8_e4m3fn),
        "e5m2": rng.standard_normal((2, 2)).astype(ml_dtypes.float8_e5m2),
        "i64": np.arange(6, dtype=np.int64).reshape(3, 2),
    }
    write_sharded(tmp_path, "m", {k: spec_of(v) for k, v in arrays.items()}, metadata={"a": "b"})
    ref = load_file(tmp_path / "m.safetensors")
    src = TensorSource.open(tmp_path / "m.safetensors")
    assert src.keys() == list(arrays) and src.metadata == {"a": "b"}
    for k, v in arrays.items():
        assert ref[k].contiguous().view(torch.uint8).numpy().tobytes() == v.tobytes()
        info = src.info(k)
        assert (info.dtype, info.shape, info.nbytes) == (v.dtype, v.shape, v.nbytes)
        got = src.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes()


def test_truncated_file_is_reported(tmp_path):
    save_file({"a": torch.zeros(1000)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        TensorSource.open(tmp_path / "x.safetensors").read("a")
    (tmp_path / "y.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a safetensors file"):
        TensorSource.open(tmp_path / "y.safetensors")


def test_load_places_each_parameter_with_its_sharding(tmp_path):
    """Loading straight onto a mesh: every parameter lands with the sharding we ask for."""
    from tests.models.test_unet import reference_unet

    cfg = UNetConfig.tiny()
    reference_unet(cfg).save_pretrained(tmp_path)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharding(path, var):
        # Shard the last axis over 8 devices where it divides, else replicate.
        spec = [None] * var.ndim
        if var.ndim and var.shape[-1] % 8 == 0:
            spec[-1] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*spec))

    comp = COMPONENTS["unet"]
    source = TensorSource.open(tmp_path / "diffusion_pytorch_model.safetensors")
    abstract = comp.abstract(cfg, param_dtype=jnp.bfloat16)
    sharded = load_module(abstract, source, comp.rules, component="unet", sharding=sharding)
    plain = load_module(
        comp.abstract(cfg, param_dtype=jnp.bfloat16), source, comp.rules, component="unet"
    )
    a = dict(nnx.to_flat_state(nnx.state(sharded, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    n_sharded = 0
    for k, v in a.items():
        arr = v.get_value()
        assert arr.dtype == jnp.bfloat16
        assert arr.sharding == sharding(k, v)
        n_sharded += arr.shape[-1] % 8 == 0
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(b[k].get_value()))
    assert n_sharded > 50
