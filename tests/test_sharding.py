"""Mesh construction, logical-axis placement, sharded init and sharded loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sdxl_jax import sharding as sh
from sdxl_jax.models.clip import CLIPTextConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.weights.components import COMPONENTS


def test_mesh_shapes_fill_and_fail_clearly():
    assert sh.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {
        "data": 2, "fsdp": 2, "tensor": 2,
    }  # fmt: skip
    mesh = sh.make_mesh({"fsdp": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 16 devices, 8 available"):
        sh.make_mesh({"data": 2, "fsdp": 8})
    with pytest.raises(ValueError, match="need a multiple of 3 devices"):
        sh.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sh.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sh.make_mesh({"data": -1, "fsdp": -1})


def test_specs_follow_rules_and_divisibility():
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    assert sh.spec_for(("embed", "heads"), (64, 32), mesh) == P("fsdp", "tensor")
    assert sh.spec_for(("heads", "embed"), (32, 64), mesh) == P("tensor", "fsdp")
    assert sh.spec_for(("embed", "mlp"), (6, 32), mesh) == P(None, "tensor")  # 6 % 4 != 0
    assert sh.spec_for(("layers", "embed", "heads"), (10, 64, 64), mesh) == P(
        None, "fsdp", "tensor"
    )
    assert sh.spec_for((None, None, "conv_in", "conv_out"), (3, 3, 4, 32), mesh) == P(
        None, None, None, "fsdp"
    )
    assert sh.spec_for(("norm",), (32,), mesh) == P(None)
    with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
        sh.spec_for(("bogus",), (4,), mesh)


def test_sharded_init_equals_plain_init_and_is_split():
    from sdxl_jax.models.clip import CLIPTextModel

    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    cfg = CLIPTextConfig.tiny_bigg()

    def make(rngs):
        return CLIPTextModel(cfg, rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)

    _, state = sh.init_sharded(make, mesh, seed=3)
    plain = jax.jit(lambda: nnx.split(make(nnx.Rngs(3)))[1])()  # unsharded, same seed
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    layers = state["text_model"]["encoder"]["layers"]
    q = layers["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == P(None, "fsdp", "tensor")  # [layers, embed, heads]
    assert q.sharding.shard_shape(q.shape) == (3, 16, 32)
    info = sh.describe(state, mesh)
    assert info["bytes_per_device"] < info["bytes"] / 4


def test_unet_weights_place_on_fsdp_and_tensor():
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    state = nnx.split(COMPONENTS["unet"].abstract(UNetConfig.tiny()))[1]
    shardings = sh.state_shardings(state, mesh)
    blocks = shardings["down_blocks"][1]["attentions"][0]["transformer_blocks"]
    assert blocks["attn1"]["to_q"]["kernel"].get_value().spec == P(None, "fsdp", "tensor")
    assert blocks["attn1"]["to_out"]["kernel"].get_value().spec == P(None, "tensor", "fsdp")


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("unet", UNetConfig.sdxl_base()),
        ("vae", VAEConfig.sdxl()),
        ("text_encoder_2", CLIPTextConfig.open_clip_bigg()),
    ],
)
def test_full_size_models_shard_almost_evenly_over_fsdp_8(name, cfg):
    mesh = sh.make_mesh({"fsdp": 8})
    state = nnx.split(COMPONENTS[name].abstract(cfg))[1]
    info = sh.describe(state, mesh)  # abstract: nothing allocated
    assert info["bytes_per_device"] <= 1.02 * info["bytes"] / 8, info
    assert not info["replicated_over_1mb"]


def test_loading_places_each_tensor_in_its_shards(tmp_path):
    from sdxl_jax.weights.diffusers_io import load_component
    from tests.models.test_unet import CONFIGS, reference_unet

    reference_unet(CONFIGS["base"]).save_pretrained(tmp_path / "unet")
    mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
    unet = load_component(tmp_path, "unet", sharding=sh.loader_sharding(mesh))
    state = nnx.split(unet)[1]
    want = sh.state_shardings(state, mesh)
    for v, s in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
        assert v.sharding.is_equivalent_to(s, v.ndim)


def test_batch_sharding_and_divisibility():
    mesh = sh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jax.device_put(np.zeros((8, 4, 4, 3), np.float32), sh.batch_sharding(mesh, 4))
    assert x.sharding.shard_shape(x.shape) == (2, 4, 4, 3)  # 4 batch shards, tensor replicates
    sh.check_batch(8, mesh)
    with pytest.raises(ValueError, match="does not divide over the batch axes data x fsdp = 4"):
        sh.check_batch(6, mesh)
