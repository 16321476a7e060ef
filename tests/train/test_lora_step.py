"""LoRA in the train step against closed forms: a fresh adapter changes nothing; adapters give
the loss of the merged weights; their gradients are the chain rule through the full model's
weight gradients; only the adapters move."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdxl_jax.models import lora
from sdxl_jax.models.unet import UNet2DConditionModel
from sdxl_jax.train import state as state_lib
from sdxl_jax.train import step as step_lib
from sdxl_jax.train.step import Inputs
from tests.train.test_step import CFG, LATENT, UNET, filled

B = 2


def inputs(seed: int = 0) -> tuple[Inputs, jax.Array, jax.Array]:
    r = np.random.default_rng(seed)
    x0 = jnp.asarray(r.standard_normal((B, LATENT, LATENT, 4)), jnp.float32)
    ctx = jnp.asarray(r.standard_normal((B, 77, UNET.cross_attention_dim)), jnp.float32)
    pooled = jnp.asarray(r.standard_normal((B, 48)), jnp.float32)
    tids = jnp.asarray(np.tile([16.0, 16, 0, 0, 16, 16], (B, 1)), jnp.float32)
    t = jnp.asarray([50, 700], jnp.int32)
    noise = jnp.asarray(r.standard_normal((B, LATENT, LATENT, 4)), jnp.float32)
    return Inputs(x0, ctx, pooled, tids), t, noise


def base_unet() -> UNet2DConditionModel:
    return filled(lambda: UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)), 3)


def with_adapters(groups=("attn", "ff", "conv"), rank=2, alpha=None, randomise=True, dropout=0.0):
    unet = base_unet()
    config = lora.LoRAConfig(rank=rank, alpha=alpha, groups=groups, dropout=dropout)
    lora.attach(unet, config, nnx.Rngs(1))
    if randomise:
        r = np.random.default_rng(7)
        for _, node in nnx.iter_graph(unet):
            if isinstance(node, lora.LoRA):
                up = node.up.get_value()
                node.up.set_value(jnp.asarray(0.3 * r.standard_normal(up.shape), up.dtype))
    return unet


def full_loss(unet: nnx.Module, ins, t, noise):
    graphs, params, _ = step_lib.split_models(unet)
    return step_lib.loss_fn(params, ins, t, noise, graphs=graphs, cfg=CFG)


def test_fresh_adapters_change_nothing_and_only_adapters_train():
    ins, t, noise = inputs()
    reference, _ = full_loss(base_unet(), ins, t, noise)
    unet = with_adapters(randomise=False)
    graphs, params, frozen = step_lib.split_models(unet)
    assert graphs.lora and set(frozen) == {"unet", "unet_rest"}
    # Only nnx.LoRAParam leaves are trained: down and up of each adapted layer.
    n_adapted = len(lora.find_targets(unet, ("attn", "ff", "conv")))
    assert len(jax.tree.leaves(params)) == 2 * n_adapted
    loss, _ = step_lib.loss_fn(params, ins, t, noise, graphs=graphs, cfg=CFG, frozen=frozen)
    np.testing.assert_allclose(float(loss), float(reference), rtol=1e-6)


def test_adapters_equal_merged_weights_and_chain_rule_gradients():
    ins, t, noise = inputs(1)
    unet = with_adapters(alpha=3.0)
    adapters = lora.adapters_of(unet)
    graphs, params, frozen = step_lib.split_models(unet)
    fn = functools.partial(step_lib.loss_fn, graphs=graphs, cfg=CFG, frozen=frozen)
    (loss, _), grads = jax.value_and_grad(fn, has_aux=True)(params, ins, t, noise)

    # Independent reference: the base with every adapter's delta added to its kernel in numpy.
    merged = base_unet()
    for (path, layer), a in adapters.items():
        var = functools.reduce(
            lambda n, s: n[s] if isinstance(s, int) else getattr(n, s), path, merged
        ).kernel
        k = np.array(var.get_value())
        if layer is None:
            k = k + a.delta()
        else:
            k[layer] = k[layer] + a.delta()
        var.set_value(jnp.asarray(k))
    m_graphs, m_params, _ = step_lib.split_models(merged)
    m_fn = functools.partial(step_lib.loss_fn, graphs=m_graphs, cfg=CFG)
    (m_loss, _), m_grads = jax.value_and_grad(m_fn, has_aux=True)(m_params, ins, t, noise)
    np.testing.assert_allclose(float(loss), float(m_loss), rtol=1e-5)

    # dL/d(up) = s * down^T dL/dW, dL/d(down) = s * dL/dW up^T (linear and conv alike, the
    # window folded into the input side), s = alpha / rank.
    flat_w = dict(nnx.to_flat_state(m_grads))
    flat_g = dict(nnx.to_flat_state(grads))
    checked = 0
    for (path, layer), a in adapters.items():
        g_w = np.asarray(flat_w[(*path, "kernel")].get_value())
        g_up = np.asarray(flat_g[(*path, "lora", "up")].get_value())
        g_down = np.asarray(flat_g[(*path, "lora", "down")].get_value())
        if layer is not None:
            g_w, g_up, g_down = g_w[layer], g_up[layer], g_down[layer]
        s = a.alpha / a.rank
        d2 = np.asarray(a.down).reshape(-1, a.rank)
        w2 = g_w.reshape(-1, g_w.shape[-1])
        np.testing.assert_allclose(g_up, s * d2.T @ w2, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(
            g_down.reshape(-1, a.rank), s * w2 @ np.asarray(a.up).T, rtol=2e-3, atol=1e-6
        )
        checked += 1
    assert checked == len(adapters) > 10


@pytest.mark.slow(seconds=40)
def test_train_step_moves_only_adapters_and_drops_with_dropout():
    ins, t, noise = inputs(2)
    unet = with_adapters(groups=("attn",), randomise=False)
    graphs, params, frozen = step_lib.split_models(unet)
    optimizer = state_lib.make_optimizer(lr=1e-2, warmup_steps=0, total_steps=10)
    state = state_lib.init_state(params, optimizer, 0)
    batch = {
        "latent_mean": ins.x0,
        "latent_logvar": jnp.full_like(ins.x0, -30.0),
        "context": ins.context,
        "pooled": ins.pooled,
        "original_size": jnp.full((B, 2), 16.0),
        "crop_coords_top_left": jnp.zeros((B, 2)),
        "target_size": jnp.full((B, 2), 16.0),
    }
    step = jax.jit(
        functools.partial(step_lib.train_step, graphs=graphs, cfg=CFG, optimizer=optimizer)
    )
    base_before = jax.tree.map(np.asarray, frozen["unet"])
    new, metrics = step(state, batch, frozen)
    assert float(metrics["skipped"]) == 0
    ups = [np.asarray(v.get_value()) for p, v in nnx.to_flat_state(new.params) if p[-1] == "up"]
    assert all(np.abs(u).max() > 0 for u in ups)  # every adapter moved off zero
    after = jax.tree.map(np.asarray, frozen["unet"])
    jax.tree.map(np.testing.assert_array_equal, base_before, after)

    # Dropout on the adapters' inputs: with up != 0 the loss depends on the drawn mask.
    drop = with_adapters(groups=("attn",), dropout=0.5)
    graphs, params, frozen = step_lib.split_models(drop)
    fn = functools.partial(step_lib.loss_fn, graphs=graphs, cfg=CFG, frozen=frozen)
    a, _ = fn(params, ins, t, noise, dropout_key=jax.random.key(0))
    b, _ = fn(params, ins, t, noise, dropout_key=jax.random.key(1))
    c, _ = fn(params, ins, t, noise)  # no key: no dropout (as in sampling)
    assert float(a) != float(b) and float(c) not in (float(a), float(b))


def text_encoders(config: lora.LoRAConfig | None, up_scale: float = 0.0):
    from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel

    pair = (
        filled(lambda: CLIPTextModel(CLIPTextConfig.tiny(), rngs=nnx.Rngs(0)), 2),
        filled(lambda: CLIPTextModel(CLIPTextConfig.tiny_bigg(), rngs=nnx.Rngs(0)), 3),
    )
    if config is not None:
        r = np.random.default_rng(11)
        for i, clip in enumerate(pair):
            lora.attach(clip, config, nnx.Rngs(20 + i))
            for _, node in nnx.iter_graph(clip):
                if isinstance(node, lora.LoRA) and up_scale:
                    up = node.up.get_value()
                    node.up.set_value(jnp.asarray(up_scale * r.standard_normal(up.shape)))
    return pair


def test_text_encoder_adapters_encode_in_the_loss():
    """Text adapters: the loss encodes the ids through them; fresh ones change nothing, random
    ones give the loss of the text encoders with merged weights, and they get gradients."""
    ins, t, noise = inputs(3)
    r = np.random.default_rng(5)
    batch = {
        "latent_mean": ins.x0,
        "latent_logvar": jnp.full_like(ins.x0, -30.0),
        "ids_l": jnp.asarray(r.integers(0, 1000, (B, 77)), jnp.int32),
        "ids_g": jnp.asarray(r.integers(0, 1000, (B, 77)), jnp.int32),
        "original_size": jnp.full((B, 2), 16.0),
        "crop_coords_top_left": jnp.zeros((B, 2)),
        "target_size": jnp.full((B, 2), 16.0),
    }
    key = jax.random.key(4)

    def loss_of(unet, encoders):
        graphs, params, frozen = step_lib.split_models(unet, text_encoders=encoders)
        x = step_lib.prepare(batch, frozen, key, graphs=graphs, cfg=CFG)
        fn = functools.partial(step_lib.loss_fn, graphs=graphs, cfg=CFG, frozen=frozen)
        return jax.value_and_grad(fn, has_aux=True)(params, x, t, noise), graphs

    config = lora.LoRAConfig(rank=2, groups=("attn", "mlp"))
    (plain, _), _ = loss_of(base_unet(), text_encoders(None))
    (fresh, grads), graphs = loss_of(with_adapters(("attn",), randomise=False),
                                     text_encoders(config))  # fmt: skip
    assert graphs.text_lora and set(grads) == {"unet", "text"}
    np.testing.assert_allclose(float(fresh[0]), float(plain[0]), rtol=1e-6)
    text_up = [v for p, v in nnx.to_flat_state(grads["text"]) if p[-1] == "up"]
    assert len(text_up) == 2 * 6  # 2 encoders x (q, k, v, out, fc1, fc2), stacked by layer
    assert all(np.abs(np.asarray(v.get_value())).max() > 0 for v in text_up)

    # Random text adapters == the encoders with each adapter merged into its kernel.
    trained = text_encoders(config, up_scale=0.5)
    merged = text_encoders(None)
    for clip, target in zip(trained, merged, strict=True):
        lora.merge(target, lora.adapters_of(clip))
    (with_lora, _), _ = loss_of(with_adapters(("attn",), randomise=False), trained)
    (reference, _), _ = loss_of(base_unet(), merged)
    np.testing.assert_allclose(float(with_lora[0]), float(reference[0]), rtol=1e-5)
    assert abs(float(with_lora[0]) - float(plain[0])) > 1e-4  # the adapters did something
