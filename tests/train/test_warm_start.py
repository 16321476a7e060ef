"""A refiner made from a base UNet (train/warm_start.py) computes what the base computes when the
base sees no CLIP-L context and its target-size embedding rows are zero: a closed-form
equivalence, independent of how the adaptation is written."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdxl_jax.models.unet import UNet2DConditionModel
from sdxl_jax.train import config as config_lib
from sdxl_jax.train.warm_start import refiner_from_base


def _random_params(model: nnx.Module, seed: int) -> None:
    """Every parameter random (zero-initialised output layers would hide mistakes)."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, new))


@nnx.jit
def _forward(model, *args):
    return model(*args)


@pytest.mark.slow(seconds=35)
def test_refiner_from_base_equals_the_base_without_clip_l_and_target_size():
    base_cfg = config_lib.unet_config("micro")
    ref_cfg = config_lib.unet_config("micro_refiner")
    base = UNet2DConditionModel(base_cfg, rngs=nnx.Rngs(0))
    _random_params(base, 1)
    refiner = UNet2DConditionModel(ref_cfg, rngs=nnx.Rngs(2))
    params = refiner_from_base(nnx.state(base, nnx.Param), base_cfg,
                               nnx.state(refiner, nnx.Param), ref_cfg)  # fmt: skip
    nnx.update(refiner, params)

    rng = np.random.default_rng(0)
    b, g = 2, ref_cfg.cross_attention_dim
    l_width = base_cfg.cross_attention_dim - g
    pooled = ref_cfg.projection_class_embeddings_input_dim - 5 * ref_cfg.addition_time_embed_dim
    x = jnp.asarray(rng.normal(size=(b, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([30.0, 150.0])
    ctx_g = jnp.asarray(rng.normal(size=(b, 7, g)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(b, pooled)), jnp.float32)
    size_crop = jnp.asarray([[64, 48, 0, 8], [32, 64, 16, 0]], jnp.float32)
    aesthetic = jnp.asarray([[6.0], [2.5]])

    got = _forward(refiner, x, t, ctx_g, text, jnp.concatenate([size_crop, aesthetic], 1))

    # the base: CLIP-L context zero, and its target-size rows of the added embedding zero
    a = base_cfg.addition_time_embed_dim
    k = base.add_embedding.linear_1.kernel
    k.value = k.value.at[pooled + 4 * a :].set(0.0)
    ctx = jnp.concatenate([jnp.zeros((b, 7, l_width)), ctx_g], -1)
    sizes = jnp.concatenate([size_crop, 99.0 + 0 * size_crop[:, :2]], 1)
    want = _forward(base, x, t, ctx, text, sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want).mean()) > 1e-2  # not trivially zero

    # the aesthetic score is ignored at first: its rows start at zero
    again = _forward(refiner, x, t, ctx_g, text, jnp.concatenate([size_crop, aesthetic + 3.0], 1))
    np.testing.assert_allclose(np.asarray(again), np.asarray(got), rtol=1e-6, atol=1e-6)


def test_refiner_with_another_architecture_is_refused():
    base_cfg = config_lib.unet_config("micro")
    ref_cfg = config_lib.unet_config("tiny_refiner")  # other channels and depths
    base = nnx.eval_shape(lambda: UNet2DConditionModel(base_cfg, rngs=nnx.Rngs(0)))
    refiner = nnx.eval_shape(lambda: UNet2DConditionModel(ref_cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="init_from=''"):
        refiner_from_base(nnx.state(base, nnx.Param), base_cfg,
                          nnx.state(refiner, nnx.Param), ref_cfg)  # fmt: skip
