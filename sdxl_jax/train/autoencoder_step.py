"""The autoencoder stage (SDXL paper 2.4; SPEC "VAE"): ``AutoencoderKL`` trained with L1 + KL +
LPIPS + an adaptively weighted PatchGAN term, with an EMA of its weights: the pure train step.

Objective (LDM's ``LPIPSWithDiscriminator``, logvar fixed at 0 as LDM's optimizer leaves it)::

    rec  = l1_weight * mean|x - x'| + perceptual_weight * mean_b LPIPS(x, x')
    kl   = mean_b sum_{h,w,c} (mu^2 + sigma^2 - 1 - log sigma^2) / 2 / (H W C)
    loss = rec + kl_weight * kl + gan * w * generator_loss(D(x'))
    w    = disc_weight * clip(|d rec / d W| / (|d gan / d W| + 1e-4), 0, 1e4)  # W: conv_out

Normalisation: LDM sums the reconstruction terms over the C*H*W pixel values of an image (the
LPIPS value counts once per pixel value) and sums the KL over latent elements. Everything here is
that objective divided by C*H*W, so ``kl_weight`` keeps LDM's meaning (1e-6), the adaptive weight
its role (it scales with the reconstruction gradient), and the loss does not grow with the
resolution. ``gan`` is 0 before ``disc_start`` steps, 1 after. The discriminator minimises its
hinge (or vanilla) loss on the real images and the same step's reconstructions with its own
optimizer, from ``disc_start`` on. A step whose losses or gradient norms are not finite changes
nothing but the counters ``skipped`` / ``bad_streak`` (as the diffusion step).

EMA: ``ema = d * ema + (1 - d) * params`` after each update, ``d = min(ema_decay, (1 + n) /
(10 + n))`` at step n when ``ema_warmup`` (LDM's ``LitEma``), so short runs get a useful EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from sdxl_jax.models.discriminator import GAN_LOSSES, discriminator_loss, generator_loss
from sdxl_jax.models.vae import AutoencoderKL, sample_posterior
from sdxl_jax.train.state import (
    applies_update,
    ema_decay_at,
    ema_update,
    learning_rate,
    update_if_finite,
)


@dataclasses.dataclass(frozen=True)
class AEStepConfig:
    """What the autoencoder step does; hashable, closed over when jitting."""

    l1_weight: float = 1.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0  # needs LPIPS weights passed to the step
    disc_weight: float = 0.5
    disc_start: int = 50_001
    disc_loss: str = "hinge"
    sample_posterior: bool = True
    crop: int = 0  # a random crop x crop window of each image inside the step; 0: whole images
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.disc_loss not in GAN_LOSSES:
            raise ValueError(f"ae.disc_loss {self.disc_loss!r}: use one of {GAN_LOSSES}")
        if min(self.l1_weight, self.kl_weight, self.perceptual_weight, self.disc_weight) < 0:
            raise ValueError(f"autoencoder loss weights must be >= 0, got {self}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"step.ema_decay must be in [0, 1], got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class AEGraphs:
    vae: Any  # nnx.GraphDef of AutoencoderKL, in the compute dtype
    disc: Any
    lpips: Any = None  # None: no perceptual term


@struct.dataclass
class AEState:
    step: jax.Array  # [] int32, train-step calls
    params: Any  # nnx.State of the VAE's nnx.Param (fp32)
    opt_state: optax.OptState
    ema: Any  # like params
    disc: Any  # nnx.State of the discriminator
    disc_opt_state: optax.OptState
    rng: jax.Array  # raw key data
    skipped: jax.Array  # [] int32
    bad_streak: jax.Array  # [] int32


# -- the objective -------------------------------------------------------------------------


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each example's latent elements: [B]."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def adaptive_weight(grad_rec: jax.Array, grad_gan: jax.Array, disc_weight: float) -> jax.Array:
    """LDM's ``calculate_adaptive_weight``: balances the GAN gradient against the reconstruction
    gradient at the decoder's last layer; a constant (no gradient flows through it)."""
    norm = lambda g: jnp.linalg.norm(g.astype(jnp.float32))  # bf16 kernels: norms in fp32
    w = norm(grad_rec) / (norm(grad_gan) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


def random_crop(key: jax.Array, x: jax.Array, size: int) -> jax.Array:
    """A uniformly placed size x size window of each image [B, H, W, C] -> [B, size, size, C]."""
    b, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    if size > min(h, w):
        raise ValueError(f"ae.crop {size} exceeds the batch's images {h}x{w}")
    k_top, k_left = jax.random.split(key)
    top = jax.random.randint(k_top, (b,), 0, h - size + 1)
    left = jax.random.randint(k_left, (b,), 0, w - size + 1)
    cut = lambda im, i, j: jax.lax.dynamic_slice(im, (i, j, 0), (size, size, c))
    return jax.vmap(cut)(x, top, left)


def decoder_features(vae: AutoencoderKL, z: jax.Array) -> jax.Array:
    """``vae.decode(z)`` up to the input of the decoder's last conv (where the adaptive weight
    is taken): ``decode(z) == conv_out(decoder_features(z))``."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    d = vae.decoder
    x = d.mid_block(d.conv_in(z))
    for block in d.up_blocks:
        x = block(x)
    return nnx.silu(d.conv_norm_out(x))


def _conv(conv: nnx.Conv, h: jax.Array, kernel: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        h,
        kernel.astype(h.dtype),
        conv.strides,
        conv.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return (y + conv.bias[...].astype(h.dtype)).astype(jnp.float32)


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, tree
    )


def autoencoder_loss(
    params: nnx.State,
    disc: nnx.State,
    lpips: nnx.State | None,
    x: jax.Array,  # [B, H, W, 3] in [-1, 1]
    key: jax.Array,
    gan_on: jax.Array,  # [] bool
    *,
    graphs: AEGraphs,
    cfg: AEStepConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The VAE's objective (module docstring); aux holds the metrics and ``xrec``."""
    dtype = jnp.dtype(cfg.compute_dtype)
    vae = nnx.merge(graphs.vae, _cast(params, dtype))
    mean, logvar = vae.encode(x.astype(dtype))  # [B, h, w, 4] fp32
    z = sample_posterior(key, mean, logvar) if cfg.sample_posterior else mean
    h = decoder_features(vae, z.astype(dtype))
    conv = vae.decoder.conv_out
    kernel = conv.kernel[...]
    xrec = _conv(conv, h, kernel)  # [B, H, W, 3] fp32
    perceptual = None
    if graphs.lpips is not None and cfg.perceptual_weight > 0:
        perceptual = nnx.merge(graphs.lpips, _cast(lpips, dtype))

    def rec_loss(r: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        l1 = jnp.mean(jnp.abs(x - r))
        p = jnp.mean(perceptual(x, r)) if perceptual is not None else jnp.zeros(())
        return cfg.l1_weight * l1 + cfg.perceptual_weight * p, (l1, p)

    rec, (l1, p) = rec_loss(xrec)
    kl = jnp.mean(kl_divergence(mean, logvar)) / np.prod(x.shape[1:])

    def with_gan(_: None) -> tuple[jax.Array, jax.Array, jax.Array]:
        d = nnx.merge(graphs.disc, _cast(disc, dtype))
        g_loss = lambda r: generator_loss(d(r.astype(dtype)), cfg.disc_loss)
        g = g_loss(xrec)
        # Gradients of both terms with respect to the last kernel, from their gradients at the
        # output: the VAE is not differentiated twice.
        hs, ks, rs = jax.lax.stop_gradient((h, kernel, xrec))
        _, head_vjp = jax.vjp(lambda k: _conv(conv, hs, k), ks)
        grad_rec = head_vjp(jax.grad(lambda r: rec_loss(r)[0])(rs))[0]
        grad_gan = head_vjp(jax.grad(g_loss)(rs))[0]
        w = adaptive_weight(grad_rec, grad_gan, cfg.disc_weight)
        return w * g, g, w

    zero = jnp.zeros((), jnp.float32)
    gan, g, w = jax.lax.cond(gan_on, with_gan, lambda _: (zero, zero, zero), None)
    loss = rec + cfg.kl_weight * kl + gan
    aux = {"l1": l1, "lpips": p, "kl": kl, "g_loss": g, "d_weight": w, "xrec": xrec}
    return loss, aux


def discriminator_objective(
    disc: nnx.State, x: jax.Array, xrec: jax.Array, *, graphs: AEGraphs, cfg: AEStepConfig
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    dtype = jnp.dtype(cfg.compute_dtype)
    d = nnx.merge(graphs.disc, _cast(disc, dtype))
    real, fake = jnp.split(d(jnp.concatenate([x, xrec]).astype(dtype)), 2)  # one pass for both
    return discriminator_loss(real, fake, cfg.disc_loss), (jnp.mean(real), jnp.mean(fake))


def train_step(
    state: AEState,
    batch: dict[str, jax.Array],
    lpips: nnx.State | None = None,
    *,
    graphs: AEGraphs,
    cfg: AEStepConfig,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
) -> tuple[AEState, dict[str, jax.Array]]:
    """One update of the VAE (and, from ``disc_start``, of the discriminator); pure."""
    key = jax.random.fold_in(state.rng, state.step)
    k_crop, k_post = jax.random.split(key)
    x = batch["image"].astype(jnp.float32)
    if cfg.crop:
        x = random_crop(k_crop, x, cfg.crop)
    gan_on = (state.step >= cfg.disc_start) & (cfg.disc_weight > 0)

    grad_fn = jax.value_and_grad(autoencoder_loss, has_aux=True)
    (loss, aux), grads = grad_fn(
        state.params, state.disc, lpips, x, k_post, gan_on, graphs=graphs, cfg=cfg
    )
    xrec = jax.lax.stop_gradient(aux.pop("xrec"))
    grad_norm = optax.global_norm(grads)

    def disc_grads(_: None) -> tuple[Any, ...]:
        d_fn = jax.value_and_grad(discriminator_objective, has_aux=True)
        (d_loss, logits), d_grads = d_fn(state.disc, x, xrec, graphs=graphs, cfg=cfg)
        return d_loss, logits, d_grads

    zero = jnp.zeros((), jnp.float32)
    no_disc = lambda _: (zero, (zero, zero), jax.tree.map(jnp.zeros_like, state.disc))
    d_loss, (real, fake), d_grads = jax.lax.cond(gan_on, disc_grads, no_disc, None)
    d_grad_norm = optax.global_norm(d_grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok &= jnp.isfinite(d_loss) & jnp.isfinite(d_grad_norm)

    def apply() -> dict[str, Any]:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moved = applies_update(state.opt_state, opt_state)
        decay = ema_decay_at(state.step, cfg.ema_decay, cfg.ema_warmup)
        new_ema = ema_update(state.ema, params, decay)
        ema = jax.tree.map(lambda n, o: jnp.where(moved, n, o), new_ema, state.ema)

        def step_disc(_: None) -> tuple[Any, Any]:
            u, d_opt = disc_optimizer.update(d_grads, state.disc_opt_state, state.disc)
            return optax.apply_updates(state.disc, u), d_opt

        keep = lambda _: (state.disc, state.disc_opt_state)
        disc, disc_opt_state = jax.lax.cond(gan_on, step_disc, keep, None)
        return dict(
            params=params, opt_state=opt_state, ema=ema, disc=disc, disc_opt_state=disc_opt_state
        )

    fields = ("params", "opt_state", "ema", "disc", "disc_opt_state")
    new_state, bad = update_if_finite(state, ok, apply, fields)
    metrics = {
        "loss": loss,
        **aux,
        "d_loss": d_loss,
        "logits_real": real,
        "logits_fake": fake,
        "grad_norm": grad_norm,
        "d_grad_norm": d_grad_norm,
        "gan": gan_on.astype(jnp.int32),
        "lr": learning_rate(new_state.opt_state),
        "skipped": bad,
    }
    return new_state, metrics
