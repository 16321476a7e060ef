"""The autoencoder stage against independent references: a PatchGAN and LDM's adaptive weight
written here in PyTorch (with diffusers' AutoencoderKL holding the same weights), the Gaussian KL
in closed form, hinge losses on hand values, EMA arithmetic, and diffusers loading the export.

One task (tiny VAE, 32 px images, one device) is shared, so the step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from experiments import autoencoder as experiment
from sdxl_jax import sharding
from sdxl_jax.models.discriminator import (
    DiscriminatorConfig,
    NLayerDiscriminator,
    discriminator_loss,
    generator_loss,
)
from sdxl_jax.train import autoencoder as ae
from sdxl_jax.train import autoencoder_step as ae_step
from sdxl_jax.train import state as state_lib
from sdxl_jax.weights.diffusers_io import save_component

B, SIDE = 4, 32


def tiny_config(**overrides):
    c = experiment.get_config("tiny")
    c.data.update(path="synthetic:16", bucket_set="tiny_square_32", global_batch_size=B)
    c.optim.update(lr=2e-3, warmup_steps=5, total_steps=100, schedule="constant")
    c.ae.update(crop=0, disc_start=40, preview_images=3, scale_images=12)
    for key, value in overrides.items():
        group, leaf = key.split("__")
        c[group][leaf] = value
    return c


def one_device_mesh():
    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def task():
    return ae.AutoencoderTask(tiny_config(), one_device_mesh())


@pytest.fixture(scope="module")
def data():
    return ae.dataset_images("synthetic:64", "tiny_square_32", 64)  # [64, 32, 32, 3]


# -- PatchGAN ------------------------------------------------------------------------------


class TorchPatchGAN(torch.nn.Module):
    """taming-transformers' NLayerDiscriminator, GroupNorm in place of BatchNorm."""

    def __init__(self, cin: int, ndf: int, n_layers: int, groups: int):
        super().__init__()
        nn = torch.nn
        norm = (
            (lambda c: nn.GroupNorm(groups, c, eps=1e-5)) if groups else (lambda c: nn.Identity())
        )
        seq = [nn.Conv2d(cin, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1), norm(ndf * mult), nn.LeakyReLU(0.2)]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1), norm(ndf * mult), nn.LeakyReLU(0.2)]
        seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)

    def forward(self, x):
        return self.main(x)


def torch_patchgan(disc: NLayerDiscriminator) -> TorchPatchGAN:
    cfg = disc.config
    ref = TorchPatchGAN(cfg.in_channels, cfg.channels, cfg.num_layers, cfg.norm_groups)
    convs = [m for m in ref.main if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ref.main if isinstance(m, torch.nn.GroupNorm)]
    t = lambda a: torch.from_numpy(np.array(a))
    with torch.no_grad():
        for ours, theirs in zip(disc.convs, convs, strict=True):
            theirs.weight.copy_(t(ours.kernel[...]).permute(3, 2, 0, 1))
            theirs.bias.copy_(t(ours.bias[...]))
        for ours, theirs in zip(disc.norms, norms, strict=True):
            theirs.weight.copy_(t(ours.scale[...]))
            theirs.bias.copy_(t(ours.bias[...]))
    return ref


def randomised(disc: NLayerDiscriminator, seed: int) -> NLayerDiscriminator:
    """Every parameter random (norm scales and biases too), so the comparison sees them all."""
    graph, state = nnx.split(disc)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    state = jax.tree.map(lambda a: 0.3 * jax.random.normal(next(keys), a.shape, a.dtype), state)
    return nnx.merge(graph, state)


def test_patchgan_matches_torch():
    cfg = DiscriminatorConfig(channels=8, num_layers=3, norm_groups=4)
    disc = randomised(NLayerDiscriminator(cfg, rngs=nnx.Rngs(0)), 1)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 48, 3)).astype(np.float32)
    ours = np.asarray(disc(jnp.asarray(x)))
    with torch.no_grad():
        ref = torch_patchgan(disc)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert ours.shape == (2, 64 // 8 - 2, 48 // 8 - 2, 1) == tuple(ref.shape)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4 * np.abs(ref.numpy()).max())


@pytest.mark.parametrize("layers", [2, 3])
def test_patchgan_receptive_field(layers):
    """The input window one logit depends on, measured by autograd in both implementations."""
    cfg = DiscriminatorConfig(channels=4, num_layers=layers, norm_groups=0)  # norms see it all
    disc = randomised(NLayerDiscriminator(cfg, rngs=nnx.Rngs(0)), 2)
    side = 128
    grad = jax.grad(lambda x: disc(x)[0, 5, 5, 0])(jnp.ones((1, side, side, 3)))
    ours = np.flatnonzero(np.abs(np.asarray(grad)[0]).sum((1, 2)))
    x = torch.ones(1, 3, side, side, requires_grad=True)
    torch_patchgan(disc)(x)[0, 0, 5, 5].backward()
    ref = np.flatnonzero(x.grad[0].abs().sum((0, 2)).numpy())
    assert ours.tolist() == ref.tolist()
    assert len(ours) == cfg.receptive_field == {2: 34, 3: 70}[layers]


# -- loss pieces ---------------------------------------------------------------------------


def test_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 3, 4, 4)), rng.uniform(-6, 1, (2, 3, 4, 4))
    ours = np.asarray(ae_step.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)))
    q = torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar)))
    p = torch.distributions.Normal(0.0, 1.0)
    ref = torch.distributions.kl_divergence(q, p).sum((1, 2, 3)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_gan_losses_on_hand_values():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = (0, .5, 2), relu(1 + fake) = (0, 1, 2)
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    sp = lambda v: np.log1p(np.exp(v))
    want = 0.5 * (np.mean(sp(-np.array([2.0, 0.5, -1.0]))) + np.mean(sp(np.array([-2.0, 0, 1]))))
    assert float(discriminator_loss(real, fake, "vanilla")) == pytest.approx(want, rel=1e-6)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(1.0 / 3)
    assert float(generator_loss(fake, "vanilla")) == pytest.approx(
        np.mean(sp(-np.array([-2, 0, 1])))
    )
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss(real, fake, "wasserstein")


def test_random_crop_cuts_windows():
    x = jnp.arange(2 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 1)
    out = np.asarray(ae_step.random_crop(jax.random.key(0), x, 4))
    for img, win in zip(np.asarray(x), out, strict=True):
        top, left = divmod(int(win[0, 0, 0]) % 64, 8)
        np.testing.assert_array_equal(win, img[top : top + 4, left : left + 4])


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """(torch VGG16 features, head weights, .safetensors path): random, as LPIPS lays them out."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).features[:30].eval()
    heads = [torch.rand(c) for c in (64, 128, 256, 512, 512)]
    sd = {f"features.{k}": v for k, v in vgg.state_dict().items()}
    sd |= {f"lin{k}.model.1.weight": w.reshape(1, -1, 1, 1) for k, w in enumerate(heads)}
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return vgg, heads, path


def torch_lpips(vgg, heads, x0, x1):
    """Zhang et al. 2018 as the lpips package computes it, differentiable: [B]."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    y, total = (torch.cat([x0, x1]) - shift) / scale, 0
    for i, layer in enumerate(vgg):
        y = layer(y)
        if i in (3, 8, 15, 22, 29):
            n = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = (n[: len(x0)] - n[len(x0) :]).pow(2)
            total = total + (d * heads[(3, 8, 15, 22, 29).index(i)].view(1, -1, 1, 1)).sum(1).mean(
                (1, 2)
            )
    return total


@pytest.mark.slow(seconds=15)
def test_loss_and_adaptive_weight_match_ldm_in_torch(task, data, lpips_file, tmp_path):
    """LDM's LPIPSWithDiscriminator (L1 + LPIPS, logvar 0, KL, hinge generator term) and its
    calculate_adaptive_weight by torch autograd on diffusers' AutoencoderKL with the same
    weights; our objective is LDM's divided by C*H*W (module docstring), and so is its gradient."""
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    vgg, heads, path = lpips_file
    c = tiny_config(ae__perceptual_path=str(path), ae__perceptual_weight=0.8)
    perceptual = ae.AutoencoderTask(c, one_device_mesh())
    state = task.init_state()
    disc = randomised(nnx.merge(task.graphs.disc, state.disc), 3)
    vae = nnx.merge(task.graph_fp32, state.params)
    save_component(vae, tmp_path, "vae")
    ref_vae = TorchAutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    ref_disc = torch_patchgan(disc)
    cfg = dataclasses.replace(
        perceptual.cfg, kl_weight=1e-2, disc_weight=0.7, sample_posterior=False
    )
    x = data[:2]
    loss_fn = functools.partial(ae_step.autoencoder_loss, graphs=perceptual.graphs, cfg=cfg)
    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    key, gan_on = jax.random.key(0), jnp.asarray(True)
    args = (state.params, nnx.state(disc), perceptual.lpips, jnp.asarray(x), key, gan_on)
    (loss, aux), grads = fn(*args)

    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    post = ref_vae.encode(xt).latent_dist
    rec = ref_vae.decode(post.mode()).sample
    n = float(np.prod(x.shape[1:]))
    p_loss = torch_lpips(vgg, heads, xt, rec).view(-1, 1, 1, 1)
    rec_loss = torch.abs(xt - rec) + cfg.perceptual_weight * p_loss
    nll = torch.sum(rec_loss) / x.shape[0]  # LDM: summed over each image's pixel values
    kl = torch.sum(post.kl()) / x.shape[0]
    g = -torch.mean(ref_disc(rec))
    last = ref_vae.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()
    d_weight = d_weight * cfg.disc_weight
    total = nll + cfg.kl_weight * kl + d_weight * g
    total.backward()

    assert 1e-2 < float(d_weight) < 1e3  # inside the clip range, where the formula matters
    assert float(aux["d_weight"]) * n == pytest.approx(float(d_weight), rel=1e-3)
    assert float(aux["lpips"]) == pytest.approx(float(p_loss.mean().detach()), rel=1e-4)
    assert float(aux["l1"]) == pytest.approx(float(torch.abs(xt - rec).mean().detach()), rel=1e-4)
    assert float(aux["g_loss"]) == pytest.approx(float(g.detach()), rel=1e-4, abs=1e-6)
    assert float(loss) == pytest.approx(float(total.detach()) / n, rel=1e-4)
    ours = np.asarray(grads["decoder"]["conv_out"]["kernel"][...]).transpose(3, 2, 0, 1) * n
    ref = last.grad.numpy()  # through VGG16's backward in both: compare as a whole, fp32 noise
    assert np.linalg.norm(ours - ref) <= 2e-3 * np.linalg.norm(ref)


def test_ema_decay_warmup():
    assert float(state_lib.ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(state_lib.ema_decay_at(90, 0.999)) == pytest.approx(91 / 100)
    assert float(state_lib.ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)
    assert float(state_lib.ema_decay_at(0, 0.999, warmup=False)) == pytest.approx(0.999)


# -- the task ------------------------------------------------------------------------------


def batch(data, rng):
    return {"image": jnp.asarray(data[rng.choice(len(data), B, replace=False)])}


def test_step_updates_ema_and_skips_non_finite_batches(task, data):
    state = task.init_state()
    init = jax.device_get(state)
    state, m = task.step(state, batch(data, np.random.default_rng(0)))
    one = jax.device_get(state)
    assert int(one.step) == 1 and int(m["skipped"]) == 0 and int(one.skipped) == 0
    # EMA after update 0: decay min(0.999, 1 / 10) = 0.1 (LitEma warm-up).
    for e, p0, p1 in zip(
        *(jax.tree.leaves(t) for t in (one.ema, init.params, one.params)), strict=True
    ):
        np.testing.assert_allclose(e, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-7)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(one.params), strict=True)
    )

    bad = batch(data, np.random.default_rng(1))
    bad["image"] = bad["image"].at[0, 3, 3, 1].set(jnp.nan)
    state, m = task.step(state, bad)
    two = jax.device_get(state)
    assert int(m["skipped"]) == 1 and int(two.skipped) == 1 and int(two.bad_streak) == 1
    assert int(two.step) == 2
    for a, b in zip(
        jax.tree.leaves((one.params, one.ema, one.opt_state, one.disc)),
        jax.tree.leaves((two.params, two.ema, two.opt_state, two.disc)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    state, m = task.step(state, batch(data, np.random.default_rng(2)))
    assert int(m["skipped"]) == 0 and int(state.bad_streak) == 0 and int(state.skipped) == 1


def test_short_run_learns_to_reconstruct(task, data):
    """60 steps: the L1 reconstruction error falls by half; from disc_start (40) the
    discriminator trains and the adaptive weight is live."""
    state = task.init_state()
    rng = np.random.default_rng(0)
    l1, d_loss, w = [], [], []
    for _ in range(60):
        state, m = task.step(state, batch(data, rng))
        l1.append(float(m["l1"]))
        d_loss.append(float(m["d_loss"]))
        w.append(float(m["d_weight"]))
    assert np.mean(l1[-5:]) < 0.5 * np.mean(l1[:3]), l1
    assert all(v == 0.0 for v in d_loss[:40]) and all(v > 0.0 for v in d_loss[40:])
    assert all(v > 0.0 for v in w[40:])
    assert int(state.skipped) == 0


def test_contract_abstract_state_and_preview(task):
    state = task.init_state()
    abstract = task.abstract_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert (a.shape, a.dtype) == (s.shape, s.dtype)
        assert a.sharding.is_equivalent_to(s.sharding, len(s.shape))
    assert state.step.dtype == state.skipped.dtype == state.bad_streak.dtype == jnp.int32
    # ae.logvar_init = -6 (the tiny config): the random posterior starts with std ~ e^-3.
    want = ae.dataset_images("synthetic:16", "tiny_square_32", 3)
    logvar = nnx.merge(task.graph_fp32, state.params).encode(jnp.asarray(want))[1]
    assert -7.0 < float(jnp.mean(logvar)) < -5.0
    grid = task.preview(state)
    assert grid.dtype == np.uint8 and grid.shape == (2 * SIDE, 3 * SIDE, 3)
    np.testing.assert_array_equal(grid[:SIDE], np.rint((np.concatenate(list(want), 1) + 1) * 127.5))


def test_export_loads_in_diffusers_and_init_from_reads_it(task, data, tmp_path):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    state = task.init_state()
    rng = np.random.default_rng(3)
    for _ in range(3):
        state, _ = task.step(state, batch(data, rng))
    folder = task.export(state, tmp_path / "export")
    assert folder == tmp_path / "export" / "vae"
    ref = TorchAutoencoderKL.from_pretrained(folder).eval()
    ours = nnx.merge(task.graph_fp32, state.ema)
    x = data[:3]
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        rec = ref.decode(post.mode()).sample.permute(0, 2, 3, 1).numpy()
        scale = ae.dataset_images("synthetic:16", "tiny_square_32", 12)
        z = ref.encode(torch.from_numpy(scale).permute(0, 3, 1, 2)).latent_dist.mean.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), rec, atol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1.0 / z.std(), rel=1e-4)
    assert ref.config.scaling_factor == config["scaling_factor"]
    scale = config["scaling_factor"]

    for init_from in (tmp_path / "export", folder):
        again = ae.AutoencoderTask(_with_init(init_from), one_device_mesh())
        loaded = again.init_state()
        for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.ema), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    bigger = _with_init(folder)  # fine-tuning takes the checkpoint's architecture
    bigger.model.preset = "tiny"
    adopted = ae.AutoencoderTask(bigger, one_device_mesh()).vae_config
    assert adopted == dataclasses.replace(ae.vae_preset("tiny_fast"), scaling_factor=scale)


def _with_init(path):
    c = tiny_config()
    c.init_from = str(path)
    return c


def test_bfloat16_step_lowers():
    """The full-size configs compute in bf16: the step lowers (no compile) to a program whose
    convolutions (VAE and discriminator, forward and backward) all run in bf16, while the state
    it returns keeps the train state's fp32 master weights, shapes and dtypes."""
    c = tiny_config(model__compute_dtype="bfloat16", ae__disc_start=0)
    bf16 = ae.AutoencoderTask(c, one_device_mesh())
    image = jax.ShapeDtypeStruct((B, SIDE, SIDE, 3), jnp.float32)
    abstract = bf16.abstract_state()
    lowered = bf16._step.lower(abstract, {"image": image}, None)

    def result_types(op: str) -> list[str]:  # "4x16x16x32xbf16" -> "bf16", per op
        lines = [ln for ln in lowered.as_text().splitlines() if f"stablehlo.{op}" in ln]
        return [ln.rsplit("->", 1)[1].strip().rstrip(">").rsplit("x", 1)[1] for ln in lines]

    convs, dots = result_types("convolution"), result_types("dot_general")
    assert len(convs) > 20 and set(convs) == {"bf16"}, sorted(set(convs))
    assert "bf16" in dots  # the attention projections (its scores may stay fp32)

    new_state, metrics = lowered.out_info
    assert jax.tree.structure(new_state) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(abstract), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
    assert {str(p.dtype) for p in jax.tree.leaves((new_state.params, new_state.ema))} == {"float32"}
    assert all(m.shape == () for m in metrics.values())
    assert metrics["loss"].dtype == metrics["l1"].dtype == jnp.float32


def test_config_errors_before_compiling():
    c = tiny_config(ae__crop=18, ae__disc_loss="wgan", model__preset="sdxl_base")
    c.ae.perceptual_path = "/nonexistent.safetensors"
    c.data.global_batch_size = 3
    with pytest.raises(ValueError) as e:
        ae.AutoencoderTask(c, sharding.make_mesh({"data": 2}, devices=jax.devices()[:2]))
    for part in (
        "global_batch_size 3",
        "model.preset 'sdxl_base'",
        "disc_loss 'wgan'",
        "perceptual_path /nonexistent",
    ):
        assert part in str(e.value)
    with pytest.raises(ValueError, match=r"ae.crop 18 must divide by 4"):
        ae.validate(tiny_config(ae__crop=18), 1)
    ae.validate(experiment.get_config(), 8)
    ae.validate(experiment.get_config("tiny"), 1)


def test_experiment_configs():
    full, tiny = experiment.get_config(), experiment.get_config("tiny")
    for c in (full, tiny):
        assert c.kind == "autoencoder" and c.stage == "autoencoder"
        assert set(c.step) == {"ema_decay"} and "remat" not in c.model
    assert ae.vae_preset(full.model.preset) == ae.VAEConfig.sdxl()
    assert full.data.global_batch_size == 256
    assert ae.vae_preset(tiny.model.preset).downscale == 4
