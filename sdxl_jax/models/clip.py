"""CLIP's towers: SDXL's text encoders (transformers ``CLIPTextModel``,
``CLIPTextModelWithProjection``) and the vision tower the CLIP score needs
(``CLIPVisionModelWithProjection``).

Text: token + position embeddings -> pre-LayerNorm transformer layers with causal self-attention
-> final LayerNorm. SDXL reads the penultimate layer's output of both encoders (no final norm)
and, from OpenCLIP bigG, the final-normed state at the end token times ``text_projection``.
The attribute tree mirrors ``CLIPTextModelWithProjection`` (``text_model.encoder.layers.{i}...``,
``text_projection``), which is also the key layout of every ``CLIPTextModel`` checkpoint written
before transformers 5.

Vision (Radford et al. 2021, a ViT): a class token + patch embeddings (a stride-``patch`` conv
without bias) + position embeddings -> ``pre_layrnorm`` (transformers' spelling) -> the same
encoder layers without the causal mask -> ``post_layernorm`` of the class token ->
``visual_projection``. The tree mirrors ``CLIPVisionModelWithProjection`` and, with the text
model's, a ``CLIPModel`` checkpoint (``vision_model.*``, ``visual_projection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models import layers

Dtype = Any
ACTIVATIONS = ("quick_gelu", "gelu")


def _check_tower(cfg: CLIPTextConfig | CLIPVisionConfig) -> None:
    """What both towers' configs must satisfy."""
    name = type(cfg).__name__
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"{name} hidden_act={cfg.hidden_act!r}: only {ACTIVATIONS} are implemented"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"{name}: hidden_size {cfg.hidden_size} does not split into {cfg.num_heads} heads; "
            f"pick a head count that divides it"
        )
    if cfg.num_layers < 1:
        raise ValueError(f"{name}: need at least one layer, got {cfg.num_layers}")
    if cfg.attention_impl not in layers.ATTENTION_IMPLS:
        raise ValueError(
            f"{name} attention_impl={cfg.attention_impl!r}: use one of {layers.ATTENTION_IMPLS}"
        )


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # quick_gelu: x * sigmoid(1.702 x); gelu: exact erf form
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # None: CLIPTextModel; int: CLIPTextModelWithProjection
    # Pooled token (transformers' rule): eos_token_id == 2 is the legacy argmax of the ids (the
    # end token has the highest id in CLIP's vocabulary); otherwise the first id == eos_token_id.
    eos_token_id: int = 2
    bos_token_id: int = 0
    pad_token_id: int = 1
    remat: bool = False  # recompute each layer's activations in the backward pass
    attention_impl: str = "auto"  # see layers.attention

    def __post_init__(self) -> None:
        _check_tower(self)

    @classmethod
    def clip_l(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14 text encoder (SDXL ``text_encoder``): 123,060,480 parameters."""
        return cls()

    @classmethod
    def open_clip_bigg(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 text encoder + projection (``text_encoder_2``): 694,659,840."""
        return cls(
            hidden_size=1280,
            intermediate_size=5120,
            num_layers=32,
            num_heads=20,
            hidden_act="gelu",
            projection_dim=1280,
        )

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """CLIP-L flavour for tests: quick_gelu, no projection."""
        return cls(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4
        )

    @classmethod
    def tiny_bigg(cls) -> CLIPTextConfig:
        """bigG flavour for tests: gelu, a projection to a different width (catches transposes)."""
        return cls(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=256,
            num_layers=3,
            num_heads=4,
            hidden_act="gelu",
            projection_dim=48,
        )


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' ``CLIPVisionConfig`` (its defaults: OpenAI ViT-B/32) plus the projection
    width, which transformers keeps on ``CLIPConfig``."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512  # None: CLIPVisionModel; int: ...WithProjection
    remat: bool = False
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        _check_tower(self)
        if not 0 < self.patch_size <= self.image_size:
            raise ValueError(
                f"CLIPVisionConfig: patch_size {self.patch_size} must be in 1..image_size "
                f"({self.image_size})"
            )

    @property
    def num_positions(self) -> int:
        """The class token + one per patch (a partial last row/column of pixels is dropped)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_b_32(cls) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-B/32 (``openai/clip-vit-base-patch32``): 87,849,216 parameters."""
        return cls()

    @classmethod
    def vit_l_14(cls) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``): 303,966,208 parameters."""
        return cls(
            hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
            patch_size=14, projection_dim=768,
        )  # fmt: skip

    @classmethod
    def vit_h_14(cls) -> CLIPVisionConfig:
        """OpenCLIP ViT-H/14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): 632,076,800."""
        return cls(
            hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16,
            patch_size=14, hidden_act="gelu", projection_dim=1024,
        )  # fmt: skip

    @classmethod
    def vit_bigg_14(cls) -> CLIPVisionConfig:
        """OpenCLIP ViT-bigG/14 (``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``): 1,844,907,264."""
        return cls(
            hidden_size=1664, intermediate_size=8192, num_layers=48, num_heads=16,
            patch_size=14, hidden_act="gelu", projection_dim=1280,
        )  # fmt: skip

    @classmethod
    def tiny(cls) -> CLIPVisionConfig:
        """For tests: odd sizes (a 40 px image in 8 px patches), projection to another width."""
        return cls(
            hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, image_size=40,
            patch_size=8, projection_dim=40,
        )  # fmt: skip


TowerConfig = CLIPTextConfig | CLIPVisionConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CLIPTextOutput:
    hidden_states: jax.Array  # [L+1, B, T, D]: the embeddings, then each layer's output
    last_hidden_state: jax.Array  # [B, T, D], final LayerNorm applied
    pooled: jax.Array  # [B, D], last_hidden_state at the end token
    text_embeds: jax.Array | None  # [B, P], pooled @ text_projection; None without one

    @property
    def penultimate(self) -> jax.Array:
        """[B, T, D]: what SDXL conditions on (second to last layer, no final LayerNorm)."""
        return self.hidden_states[-2]


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        d = cfg.hidden_size
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_metadata={"logical_axes": ("vocab", "embed")},
        )  # fmt: skip
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_metadata={"logical_axes": (None, "embed")},
        )  # fmt: skip

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPAttention(nnx.Module):
    def __init__(
        self, cfg: TowerConfig, *, causal: bool, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = cfg.num_heads
        self.impl = cfg.attention_impl
        self.causal = causal
        self.q_proj = layers.linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = layers.linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = layers.linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = layers.linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        q = layers.split_heads(self.q_proj(x), self.heads)  # [B, T, N, H]
        k = layers.split_heads(self.k_proj(x), self.heads)
        v = layers.split_heads(self.v_proj(x), self.heads)
        o = layers.attention(q, k, v, causal=self.causal, implementation=self.impl)
        return self.out_proj(layers.merge_heads(o))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = cfg.hidden_act
        self.fc1 = layers.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = layers.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_activation(self.act, self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)); the text tower's
    attention is causal, the vision tower's not."""

    def __init__(
        self, cfg: TowerConfig, *, causal: bool, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(cfg, causal=causal, **kw)
        self.layer_norm1 = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(
        self, cfg: TowerConfig, *, causal: bool, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype
    ):
        self.layers = layers.stacked(
            lambda r: CLIPEncoderLayer(
                cfg, causal=causal, rngs=r, dtype=dtype, param_dtype=param_dtype
            ),
            cfg.num_layers,
            rngs,
        )


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, causal=True, **kw)
        self.final_layer_norm = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)


class CLIPTextModel(nnx.Module):
    """CLIP text encoder; with ``config.projection_dim`` set, also the pooled projection."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.text_model = CLIPTextTransformer(config, **kw)
        if config.projection_dim is not None:
            d, p = config.hidden_size, config.projection_dim
            self.text_projection = layers.linear(d, p, ("embed", "proj"), use_bias=False, **kw)

    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids [B, T] int, T <= max_position_embeddings."""
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP text encoder takes input_ids [B, T] with T <= "
                f"{cfg.max_position_embeddings}, got shape {tuple(input_ids.shape)}"
            )
        tm = self.text_model
        h0 = tm.embeddings(input_ids)  # [B, T, D]
        h, per_layer = layers.scan_apply(tm.encoder.layers, h0, remat=cfg.remat, collect=True)
        hidden_states = jnp.concatenate([h0[None], per_layer], axis=0)  # [L+1, B, T, D]
        last = tm.final_layer_norm(h)
        if cfg.eos_token_id == 2:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first match
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # [B, D]
        text_embeds = self.text_projection(pooled) if cfg.projection_dim is not None else None
        return CLIPTextOutput(hidden_states, last, pooled, text_embeds)


# --- the vision tower --------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + patches, D], no post_layernorm (as transformers')
    pooled: jax.Array  # [B, D], post_layernorm of the class token
    image_embeds: jax.Array | None  # [B, P], pooled @ visual_projection; None without one


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        d, p = cfg.hidden_size, cfg.patch_size
        self.dtype = dtype
        init = nnx.initializers.normal(1.0)
        self.class_embedding = nnx.Param(
            init(rngs.params(), (d,), param_dtype), logical_axes=("embed",)
        )
        self.patch_embedding = layers.conv(
            cfg.num_channels, d, p, stride=p, padding="VALID", use_bias=False, rngs=rngs,
            dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip
        self.position_embedding = nnx.Embed(
            cfg.num_positions, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_metadata={"logical_axes": (None, "embed")},
        )  # fmt: skip

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixel_values.astype(self.dtype))  # [B, g, g, D]
        b, gh, gw, d = patches.shape
        patches = patches.reshape(b, gh * gw, d)  # row-major, as torch's flatten(2)
        cls_tok = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, d))
        x = jnp.concatenate([cls_tok, patches], axis=1)  # [B, 1 + g*g, D]
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.encoder = CLIPEncoder(cfg, causal=False, **kw)
        self.post_layernorm = layers.layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)


class CLIPVisionModel(nnx.Module):
    """CLIP vision tower; with ``config.projection_dim`` set, also ``visual_projection``."""

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.vision_model = CLIPVisionTransformer(config, **kw)
        if config.projection_dim is not None:
            d, p = config.hidden_size, config.projection_dim
            self.visual_projection = layers.linear(d, p, ("embed", "proj"), use_bias=False, **kw)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """pixel_values [B, S, S, C] float, normalised as the checkpoint's image processor does."""
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"CLIP vision tower takes pixel_values [B, {want[0]}, {want[1]}, {want[2]}] "
                f"(NHWC), got shape {tuple(pixel_values.shape)}"
            )
        vm = self.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))
        last = layers.scan_apply(vm.encoder.layers, h, remat=cfg.remat)
        pooled = vm.post_layernorm(last[:, 0])  # [B, D]
        embeds = self.visual_projection(pooled) if cfg.projection_dim is not None else None
        return CLIPVisionOutput(last, pooled, embeds)
