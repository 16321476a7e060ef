"""The SDXL UNet (base and refiner) as one Flax NNX module for every size.

Mirrors diffusers' ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` and linear
transformer projections: attribute names follow its module tree (``down_blocks[i].attentions[j]
.transformer_blocks.attn1.to_q``) so weight conversion is a short rule table. Each level's
transformer blocks are one stacked module run under ``nnx.scan``. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models import layers

Dtype = Any


@dataclass(frozen=True)
class UNetConfig:
    """UNet hyperparameters. ``transformer_depth[i] == 0`` means level ``i`` has no attention."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int | tuple[int, ...] = 2  # ResNet blocks per level (decoder: one more)
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    mid_transformer_depth: int = 10
    num_heads: tuple[int, ...] = (5, 10, 20)  # per level; the mid block uses the last
    cross_attention_dim: int = 2048
    in_channels: int = 4
    out_channels: int = 4
    # "text_time": pooled text (dim = projection_dim - n * addition_time_embed_dim) plus
    # sinusoidal embeddings of the n micro-conditioning numbers, added to the time embedding.
    addition_embed_type: str | None = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    sample_size: int = 128
    remat: bool | str = False  # recompute each transformer block in the backward pass (or a
    # layers.REMAT_POLICIES name: recompute all but what it saves)
    scan_unroll: int | bool = 1  # lax.scan unroll of the transformer stacks
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if isinstance(self.layers_per_block, int):
            object.__setattr__(self, "layers_per_block", (self.layers_per_block,) * n)
        object.__setattr__(self, "layers_per_block", tuple(self.layers_per_block))
        if len(self.layers_per_block) != n or min(self.layers_per_block) < 1:
            raise ValueError(
                f"UNetConfig: layers_per_block needs one entry >= 1 per level ({n}), "
                f"got {self.layers_per_block}"
            )
        if len(self.transformer_depth) != n or len(self.num_heads) != n:
            raise ValueError(
                f"UNetConfig: block_out_channels, transformer_depth and num_heads need one entry "
                f"per level ({n}); got {len(self.transformer_depth)} and {len(self.num_heads)}"
            )
        for c, h in zip(self.block_out_channels, self.num_heads, strict=True):
            if c % h:
                raise ValueError(f"UNetConfig: {c} channels do not split into {h} heads")
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: {c} channels do not split into {self.norm_num_groups} groups"
                )
        if self.mid_transformer_depth < 1:
            raise ValueError("UNetConfig: the mid block needs at least one transformer block")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNetConfig: addition_embed_type {self.addition_embed_type!r} unsupported"
            )
        layers.remat_policy(self.remat)  # a known policy name (raises otherwise)
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f"UNetConfig: attention_impl must be one of {layers.ATTENTION_IMPLS}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def sdxl_base(cls, **kw: Any) -> UNetConfig:
        return cls(**kw)

    @classmethod
    def sdxl_refiner(cls, **kw: Any) -> UNetConfig:
        return cls(
            **{
                **dict(
                    block_out_channels=(384, 768, 1536, 1536),
                    transformer_depth=(0, 4, 4, 0),
                    mid_transformer_depth=4,
                    num_heads=(6, 12, 24, 24),
                    cross_attention_dim=1280,
                    projection_class_embeddings_input_dim=2560,
                ),
                **kw,
            }
        )

    @classmethod
    def tiny(cls, **kw: Any) -> UNetConfig:
        """A small SDXL-shaped UNet for tests and CPU runs (3 levels, no attention at level 0)."""
        return cls(
            **{
                **dict(
                    block_out_channels=(32, 64, 64),
                    layers_per_block=1,
                    transformer_depth=(0, 1, 2),
                    mid_transformer_depth=2,
                    num_heads=(2, 2, 4),
                    # Fits CLIPTextConfig.tiny() + tiny_bigg(): context 64 + 64, pooled 48.
                    cross_attention_dim=128,
                    addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=48 + 6 * 8,
                    norm_num_groups=8,
                    sample_size=16,
                ),
                **kw,
            }
        )

    def replace(self, **kw: Any) -> UNetConfig:
        return dataclasses.replace(self, **kw)


# The tiny refiner reads the tiny bigG-only context (64 wide) and 5 time ids; the micro UNet is
# the test size (two levels, one transformer block: about half tiny's compile time on a CPU).
REFINER_TEXT = {"cross_attention_dim": 64, "projection_class_embeddings_input_dim": 48 + 5 * 8}
MICRO = dict(
    block_out_channels=(16, 32), transformer_depth=(0, 1), mid_transformer_depth=1, num_heads=(2, 2)
)
PRESETS = {
    "sdxl_base": UNetConfig.sdxl_base,
    "sdxl_refiner": UNetConfig.sdxl_refiner,
    "tiny": UNetConfig.tiny,
    "tiny_refiner": lambda **kw: UNetConfig.tiny(**{**REFINER_TEXT, **kw}),
    "micro": lambda **kw: UNetConfig.tiny(**{**MICRO, **kw}),
    "micro_refiner": lambda **kw: UNetConfig.tiny(**{**MICRO, **REFINER_TEXT, **kw}),
}


def preset(name: str, **overrides: Any) -> UNetConfig:
    """A named UNetConfig (PRESETS), with ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: use one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


# -- blocks ------------------------------------------------------------------------------------


class TimestepEmbedding(nnx.Module):
    """Linear -> SiLU -> Linear."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = layers.linear(din, dout, (None, "embed"), **kw)
        self.linear_2 = layers.linear(dout, dout, ("embed", None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Attention(nnx.Module):
    """Multi-head attention: q/k/v without bias, output projection with bias."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None,
        impl: str,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ctx = context_dim or dim
        self.heads = heads
        self.impl = impl
        self.to_q = layers.linear(dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_k = layers.linear(ctx, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_v = layers.linear(ctx, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_out = layers.linear(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        q = layers.split_heads(self.to_q(x), self.heads)
        k = layers.split_heads(self.to_k(context), self.heads)
        v = layers.split_heads(self.to_v(context), self.heads)
        return self.to_out(layers.merge_heads(layers.attention(q, k, v, implementation=self.impl)))


class FeedForward(nnx.Module):
    """GEGLU feed-forward: d -> 2 x 4d (value, gate) -> value * gelu(gate) -> d."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = layers.linear(dim, dim * 8, ("embed", "mlp"), **kw)
        self.out = layers.linear(dim * 4, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(h * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int,
        impl: str,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads, None, impl, **kw)
        self.norm2 = layers.layer_norm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads, context_dim, impl, **kw)
        self.norm3 = layers.layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # x [B, T, D]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> linear proj_in -> scanned transformer blocks -> proj_out, residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        depth: int,
        cfg: UNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.remat = cfg.remat
        self.unroll = cfg.scan_unroll
        self.norm = layers.group_norm(dim, cfg.norm_num_groups, 1e-6, **kw)
        self.proj_in = layers.linear(dim, dim, ("embed", "mlp"), **kw)
        self.transformer_blocks = layers.stacked(
            lambda r: BasicTransformerBlock(
                dim,
                heads,
                cfg.cross_attention_dim,
                cfg.attention_impl,
                rngs=r,
                dtype=dtype,
                param_dtype=param_dtype,
            ),
            depth,
            rngs,
        )
        self.proj_out = layers.linear(dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:  # x [B, H, W, C]
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        y = layers.scan_apply(
            self.transformer_blocks, y, context, remat=self.remat, unroll=self.unroll
        )
        return layers.constrain_batch(x + self.proj_out(y).reshape(b, h, w, c))


def level_attentions(
    cfg: UNetConfig, level: int, dim: int, n: int, kw: dict[str, Any]
) -> nnx.List | None:
    """The ``n`` transformers that follow a level's ResNet blocks, or None (depth 0)."""
    depth = cfg.transformer_depth[level]
    if not depth:
        return None
    return nnx.List(
        [Transformer2DModel(dim, cfg.num_heads[level], depth, cfg, **kw) for _ in range(n)]
    )


class DownBlock(nnx.Module):
    """One encoder level: ResNet blocks (each followed by a transformer if depth > 0), then an
    optional stride-2 downsampler. diffusers: DownBlock2D / CrossAttnDownBlock2D."""

    def __init__(
        self,
        cin: int,
        cout: int,
        level: int,
        add_downsample: bool,
        cfg: UNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        n = cfg.layers_per_block[level]
        self.resnets = nnx.List(
            [
                layers.ResnetBlock2D(cin if j == 0 else cout, cout, temb, g, eps, **kw)
                for j in range(n)
            ]
        )
        self.attentions = level_attentions(cfg, level, cout, n, kw)
        self.downsamplers = nnx.List([layers.Downsample2D(cout, **kw)]) if add_downsample else None

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """One decoder level: ResNet blocks over [x, skip] (each followed by a transformer if
    depth > 0), then an optional upsampler. diffusers: UpBlock2D / CrossAttnUpBlock2D."""

    def __init__(
        self,
        cin: int,
        cprev: int,
        cout: int,
        level: int,
        add_upsample: bool,
        cfg: UNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype,
        param_dtype: Dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        n = cfg.layers_per_block[level] + 1
        resnets = []
        for j in range(n):
            skip = cin if j == n - 1 else cout
            x_in = cprev if j == 0 else cout
            resnets.append(layers.ResnetBlock2D(x_in + skip, cout, temb, g, eps, **kw))
        self.resnets = nnx.List(resnets)
        self.attentions = level_attentions(cfg, level, cout, n, kw)
        self.upsamplers = nnx.List([layers.Upsample2D(cout, **kw)]) if add_upsample else None

    def __call__(
        self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array
    ) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            # The next level's skip sets the size: latents need not divide by 2^levels.
            x = self.upsamplers[0](x, skips[-1].shape[1:3])
        return x


class MidBlock(nnx.Module):
    """ResNet -> transformer -> ResNet at the lowest resolution (UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c = cfg.block_out_channels[-1]
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nnx.List([layers.ResnetBlock2D(c, c, temb, g, eps, **kw) for _ in range(2)])
        self.attentions = nnx.List(
            [Transformer2DModel(c, cfg.num_heads[-1], cfg.mid_transformer_depth, cfg, **kw)]
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nnx.Module):
    """The SDXL UNet: noise prediction from latents, timestep, text context and vector cond."""

    def __init__(
        self,
        config: UNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        cfg = self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = cfg.block_out_channels
        n = len(chans)
        self.conv_in = layers.conv(cfg.in_channels, chans[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(chans[0], cfg.time_embed_dim, **kw)
        self.add_embedding = (
            TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, **kw)
            if cfg.addition_embed_type == "text_time"
            else None
        )
        self.down_blocks = nnx.List(
            [DownBlock(chans[max(i - 1, 0)], chans[i], i, i < n - 1, cfg, **kw) for i in range(n)]
        )
        self.mid_block = MidBlock(cfg, **kw)
        ups = []
        for i in range(n):
            level = n - 1 - i
            cprev = chans[min(level + 1, n - 1)]
            cin = chans[max(level - 1, 0)]
            ups.append(UpBlock(cin, cprev, chans[level], level, i < n - 1, cfg, **kw))
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = layers.group_norm(chans[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = layers.conv(chans[0], cfg.out_channels, 3, **kw)

    def __call__(
        self,
        sample: jax.Array,  # [B, H, W, C_in] latents
        timesteps: jax.Array,  # [B] or scalar, discrete (or fractional) noise levels
        encoder_hidden_states: jax.Array,  # [B, T, context]
        text_embeds: jax.Array | None = None,  # [B, pooled]
        time_ids: jax.Array | None = None,  # [B, n] sizes / crop / (target or aesthetic)
    ) -> jax.Array:
        cfg = self.config
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        t_emb = layers.timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError(
                    "this UNet needs text_embeds (pooled) and time_ids (micro-conditioning)"
                )
            ids = layers.timestep_embedding(
                time_ids.reshape(-1),
                cfg.addition_time_embed_dim,
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                freq_shift=cfg.freq_shift,
            ).reshape(b, -1)
            vec = jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1)
            if vec.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"pooled ({text_embeds.shape[-1]}) + {time_ids.shape[-1]} time ids x "
                    f"{cfg.addition_time_embed_dim} = {vec.shape[-1]}, but the UNet expects "
                    f"{cfg.projection_class_embeddings_input_dim}"
                )
            emb = emb + self.add_embedding(vec.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)

        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, context)
            skips.extend(s)
        x = self.mid_block(x, emb, context)
        for block in self.up_blocks:
            x = block(x, skips, emb, context)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)
