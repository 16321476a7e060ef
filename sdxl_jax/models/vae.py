"""The SDXL VAE (diffusers ``AutoencoderKL``), NHWC.

Encoder: conv_in -> down blocks (ResNets, then a stride-2 conv except at the last level) ->
mid block (ResNet, single-head self-attention over all pixels, ResNet) -> GroupNorm, SiLU ->
conv_out to 2 x latent channels (mean, logvar) -> quant_conv. The decoder mirrors it, with one
more ResNet per level and nearest-neighbour 2x upsampling. GroupNorm eps is 1e-6 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models import layers

Dtype = Any
EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder has one more per level
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 1024
    # How latents are scaled for the diffusion model: see to_diffusion_latents.
    scaling_factor: float = 0.13025
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # fp16 overflows: decode in fp32 or bf16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        if not self.block_out_channels or self.layers_per_block < 1:
            raise ValueError(
                f"VAEConfig: need at least one level and one ResNet per level, got "
                f"block_out_channels={self.block_out_channels}, "
                f"layers_per_block={self.layers_per_block}"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: channels {bad} do not split into "
                f"norm_num_groups={self.norm_num_groups}; pick channels that are multiples of it"
            )

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """stabilityai/sdxl-vae: 83,653,863 parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Three levels, a channel change, two ResNets per level: every kind of layer, for tests."""
        return cls(
            block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, sample_size=32
        )

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


class Attention(nnx.Module):
    """Single-head self-attention over all H*W positions, residual (diffusers ``Attention``)."""

    def __init__(
        self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = layers.group_norm(channels, groups, EPS, **kw)
        self.to_q = layers.linear(channels, channels, ("embed", "heads"), **kw)
        self.to_k = layers.linear(channels, channels, ("embed", "heads"), **kw)
        self.to_v = layers.linear(channels, channels, ("embed", "heads"), **kw)
        self.to_out = layers.linear(channels, channels, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)  # [B, T, C]
        # One head of width C: [B, T, 1, C].
        q, k, v = (proj(y)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
        o = layers.attention(q, k, v)[:, :, 0, :]
        return x + self.to_out(o).reshape(b, h, w, c)


class UNetMidBlock2D(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c, g = cfg.block_out_channels[-1], cfg.norm_num_groups
        self.resnets = nnx.List([layers.ResnetBlock2D(c, c, None, g, EPS, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(c, g, **kw)] if cfg.mid_block_add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        cfg: VAEConfig,
        downsample: bool,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        g = cfg.norm_num_groups
        self.resnets = nnx.List(
            [
                layers.ResnetBlock2D(cin if j == 0 else cout, cout, None, g, EPS, **kw)
                for j in range(cfg.layers_per_block)
            ]
        )
        self.downsamplers = nnx.List(
            [layers.Downsample2D(cout, ((0, 1), (0, 1)), **kw)] if downsample else []
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in (*self.resnets, *self.downsamplers):
            x = block(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        cfg: VAEConfig,
        upsample: bool,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        g = cfg.norm_num_groups
        self.resnets = nnx.List(
            [
                layers.ResnetBlock2D(cin if j == 0 else cout, cout, None, g, EPS, **kw)
                for j in range(cfg.layers_per_block + 1)
            ]
        )
        self.upsamplers = nnx.List([layers.Upsample2D(cout, **kw)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in (*self.resnets, *self.upsamplers):
            x = block(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ch = cfg.block_out_channels
        self.conv_in = layers.conv(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg, i < len(ch) - 1, **kw)
                for i in range(len(ch))
            ]
        )
        self.mid_block = UNetMidBlock2D(cfg, **kw)
        self.conv_norm_out = layers.group_norm(ch[-1], cfg.norm_num_groups, EPS, **kw)
        self.conv_out = layers.conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        rev = cfg.block_out_channels[::-1]
        self.conv_in = layers.conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(cfg, **kw)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg, i < len(rev) - 1, **kw)
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = layers.group_norm(rev[-1], cfg.norm_num_groups, EPS, **kw)
        self.conv_out = layers.conv(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Images [B, H, W, C] in [-1, 1] <-> latents [B, H/8, W/8, 4] (SDXL), NHWC throughout."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        lat = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = layers.conv(2 * lat, 2 * lat, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = (
            layers.conv(lat, lat, 1, **kw) if config.use_post_quant_conv else None
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image [B, H, W, C] -> posterior (mean, logvar), each [B, H/f, W/f, latent], fp32."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent [B, h, w, latent] (unscaled) -> image [B, h*f, w*f, C]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruct: decode the posterior mode, or a sample from it when ``key`` is given."""
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_posterior(key, mean, logvar)
        return self.decode(z)


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z ~ N(mean, exp(logvar)), the diagonal Gaussian posterior."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def _latent_stats(config: VAEConfig) -> tuple[Any, Any]:
    # Per-channel latents_mean/std when the config has them (as diffusers' SDXL pipeline uses
    # them), else the scalar shift_factor (SD3/Flux style; 0 for SDXL).
    if config.latents_mean is not None and config.latents_std is not None:
        return jnp.asarray(config.latents_mean), jnp.asarray(config.latents_std)
    return config.shift_factor or 0.0, 1.0


def to_diffusion_latents(z: jax.Array, config: VAEConfig) -> jax.Array:
    """VAE latents [..., C] -> the scale the diffusion model sees: (z - shift) * scaling / std."""
    shift, std = _latent_stats(config)
    return (z - shift) * config.scaling_factor / std


def from_diffusion_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
    """Inverse of :func:`to_diffusion_latents`, before :meth:`AutoencoderKL.decode`."""
    shift, std = _latent_stats(config)
    return latents * std / config.scaling_factor + shift
