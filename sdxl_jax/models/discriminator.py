"""PatchGAN discriminator (pix2pix, Isola et al. 2017; taming-transformers' and LDM's
``NLayerDiscriminator``) and the GAN losses of the autoencoder stage.

``num_layers`` stride-2 4x4 convs (channels ``c, 2c, 4c, ...`` capped at ``8c``), one stride-1
4x4 conv, then a stride-1 4x4 conv to one channel: a map of real/fake logits, one per image
patch (70x70 pixels for the default 3 layers). Every conv pads 1 pixel; LeakyReLU(0.2) after
all but the last.

taming normalises with BatchNorm. Here the normalisation is GroupNorm (or none): batch
statistics would be state carried outside the parameters, differ between real and fake halves
of a batch and between data-parallel shards, and couple the examples of a batch; GroupNorm
normalises each image on its own, so the discriminator is a pure function of its parameters.
The convs keep their biases (redundant before a GroupNorm, harmless).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models import layers

Dtype = Any
GAN_LOSSES = ("hinge", "vanilla")


@dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64  # ndf: width of the first conv
    num_layers: int = 3  # stride-2 convs; 3 -> 70x70 patches
    norm_groups: int = 32  # GroupNorm groups after every conv but the first and last; 0: none

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.channels < 1:
            raise ValueError(f"DiscriminatorConfig: need num_layers, channels >= 1, got {self}")
        bad = [c for c in self.widths[1:] if self.norm_groups and c % self.norm_groups]
        if bad:
            raise ValueError(
                f"DiscriminatorConfig: widths {bad} do not split into norm_groups="
                f"{self.norm_groups}; pick channels that are a multiple of it, or norm_groups=0"
            )

    @classmethod
    def patchgan(cls) -> DiscriminatorConfig:
        """LDM's autoencoder discriminator: 64 channels, 3 layers, 70x70 patches."""
        return cls()

    @classmethod
    def tiny(cls) -> DiscriminatorConfig:
        """16 channels, 2 layers: 34x34 patches, for 32-64 px CPU runs."""
        return cls(channels=16, num_layers=2, norm_groups=8)

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of each conv before the final one."""
        return tuple(self.channels * min(2**n, 8) for n in range(self.num_layers + 1))

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input patch one logit sees."""
        r = 1
        for stride in (1, 1) + (2,) * self.num_layers:  # from the output back to the input
            r = (r - 1) * stride + 4
        return r


class NLayerDiscriminator(nnx.Module):
    """Images [B, H, W, C] -> patch logits [B, H', W', 1] (fp32); H' = H / 2^num_layers - 2."""

    def __init__(
        self,
        cfg: DiscriminatorConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        pad = ((1, 1), (1, 1))
        chans = (cfg.in_channels, *cfg.widths, 1)
        self.convs = nnx.List(
            [
                layers.conv(
                    chans[i],
                    chans[i + 1],
                    4,
                    stride=2 if i < cfg.num_layers else 1,
                    padding=pad,
                    **kw,
                )
                for i in range(len(chans) - 1)
            ]
        )
        self.norms = nnx.List(
            [
                layers.group_norm(c, cfg.norm_groups, 1e-5, **kw)
                for c in (cfg.widths[1:] if cfg.norm_groups else ())
            ]
        )
        # pix2pix / taming init: conv weights N(0, 0.02), biases 0.
        for conv in self.convs:
            k = conv.kernel
            conv.kernel.set_value(0.02 * jax.random.normal(rngs.params(), k.shape, k.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        *hidden, last = self.convs
        for i, conv in enumerate(hidden):
            x = conv(x)
            if i and self.norms:
                x = self.norms[i - 1](x)
            x = nnx.leaky_relu(x, 0.2)
        return last(x).astype(jnp.float32)


def discriminator_loss(real: jax.Array, fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """The discriminator's loss on its logits for real and reconstructed images (LDM):
    hinge ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``, vanilla (the non-saturating
    cross-entropy) ``(mean softplus(-real) + mean softplus(fake)) / 2``."""
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    if kind == "vanilla":
        return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))
    raise ValueError(f"unknown GAN loss {kind!r}: use one of {GAN_LOSSES}")


def generator_loss(fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """The autoencoder's adversarial loss on the logits of its reconstructions: ``-mean(fake)``
    with the hinge discriminator (LDM), ``mean softplus(-fake)`` (non-saturating) with vanilla."""
    if kind == "hinge":
        return -jnp.mean(fake)
    if kind == "vanilla":
        return jnp.mean(jax.nn.softplus(-fake))
    raise ValueError(f"unknown GAN loss {kind!r}: use one of {GAN_LOSSES}")
