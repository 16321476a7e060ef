"""Stage checkpoints: exact round trip, restore onto another mesh, crash safety, final EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdxl_jax import checkpoint as ck
from sdxl_jax import sharding as sh
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.train.state import init_state, make_optimizer
from sdxl_jax.train.step import split_models
from sdxl_jax.weights.components import COMPONENTS

CFG = UNetConfig.tiny(
    block_out_channels=(16, 32), transformer_depth=(0, 1), num_heads=(2, 2), mid_transformer_depth=1
)
OPT = make_optimizer(lr=1e-3, warmup_steps=2, total_steps=10)


def abstract_state():
    _, params, _ = split_models(COMPONENTS["unet"].abstract(CFG))
    return params, jax.eval_shape(lambda p: init_state(p, OPT, 0), params)


def random_state(mesh, seed=0):
    """A TrainState whose every float leaf (params, Adam moments, EMA) is distinct random data."""
    params_abs, state_abs = abstract_state()
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), params_abs)
    shardings = sh.tree_shardings(state_abs, mesh)
    state = jax.jit(lambda p: init_state(p, OPT, seed), out_shardings=shardings)(params)

    def fill(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        value = rng.standard_normal(x.shape).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(fill, state)


def test_restore_onto_another_mesh_is_exact(tmp_path):
    saved = random_state(sh.make_mesh({"fsdp": 8}))
    stage = ck.StageCheckpoints(tmp_path / "base_256")
    stage.save(5, saved, {"step": 5, "seed": 0}, {"stage": "base_256"})
    stage.wait()
    assert stage.latest_step() == 5

    mesh = sh.make_mesh({"data": 2, "fsdp": 4})
    _, state_abs = abstract_state()
    target = ck.abstract_like(state_abs, sh.tree_shardings(state_abs, mesh))
    state, data, meta = ck.StageCheckpoints(tmp_path / "base_256").restore(target)
    assert data == {"step": 5, "seed": 0} and meta == {"stage": "base_256"}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = jax.tree.leaves(state.params)[3]
    assert leaf.sharding.mesh.shape["data"] == 2  # placed on the new mesh


@pytest.mark.parametrize(
    "axes, n_devices",
    [({"data": 2, "fsdp": 2, "tensor": 2}, 8), ({"fsdp": 4}, 4), ({"data": 1}, 1)],
    ids=["tensor-split", "half-the-devices", "one-device"],
)
def test_restore_onto_other_topologies(tmp_path, axes, n_devices):
    """Saved with fsdp=8; restored onto a tensor-split mesh and onto fewer devices (as on a
    smaller host count): params, both Adam moments, EMA, step and rng all come back."""
    saved = random_state(sh.make_mesh({"fsdp": 8}), seed=7)
    assert not np.allclose(
        np.asarray(jax.tree.leaves(saved.ema)[0]), np.asarray(jax.tree.leaves(saved.params)[0])
    )
    stage = ck.StageCheckpoints(tmp_path / "s")
    stage.save(3, saved, {"step": 3}, {})
    stage.close()
    mesh = sh.make_mesh(axes, devices=jax.devices()[:n_devices])
    _, state_abs = abstract_state()
    target = ck.abstract_like(state_abs, sh.tree_shardings(state_abs, mesh))
    state, data, _ = ck.StageCheckpoints(tmp_path / "s").restore(target)
    assert data == {"step": 3}
    paths_saved = jax.tree_util.tree_leaves_with_path(saved)
    for (path, a), b in zip(paths_saved, jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path))
        if hasattr(b, "sharding"):
            assert b.sharding.mesh.devices.size == n_devices, path


def test_an_unfinished_save_is_ignored(tmp_path):
    mesh = sh.make_mesh({"fsdp": 8})
    stage = ck.StageCheckpoints(tmp_path / "s", async_save=False)
    stage.save(1, random_state(mesh), {"step": 1}, {})
    stage.wait()
    # What a crash mid-save leaves: orbax's temporary folder for step 2, never renamed.
    (tmp_path / "s" / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir()
    again = ck.StageCheckpoints(tmp_path / "s")
    assert again.latest_step() == 1
    _, state_abs = abstract_state()
    state, data, _ = again.restore(ck.abstract_like(state_abs, sh.tree_shardings(state_abs, mesh)))
    assert data == {"step": 1}


def test_final_ema_hands_over_to_the_next_stage(tmp_path):
    mesh = sh.make_mesh({"fsdp": 8})
    state = random_state(mesh, seed=4)
    ck.StageCheckpoints(tmp_path / "base_256").save_final_ema(state.ema)
    params_abs, _ = abstract_state()
    target = ck.abstract_like(params_abs, sh.tree_shardings(params_abs, mesh))
    ema = ck.load_final_ema(tmp_path / "base_256", target)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="has not finished"):
        ck.load_final_ema(tmp_path / "base_512", target)
