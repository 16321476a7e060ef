"""Reference ``config.json`` <-> our config dataclasses, one pair of translators per model.

``*_from_reference(dict)`` reads a diffusers (``UNet2DConditionModel``, ``AutoencoderKL``) or
transformers (``CLIPTextModel``, ``CLIPTextModelWithProjection``, ``CLIPModel``) config.json and
refuses settings
we do not implement; keys it omits take the reference class's defaults, as the reference library
would. ``*_to_reference(config)`` writes a complete config.json dict the reference library loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sdxl_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig

DIFFUSERS_VERSION = "0.42.1"  # the version whose UNet2DConditionModel / AutoencoderKL we mirror
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")  # [has a projection]

# AutoencoderKL's constructor defaults: what diffusers uses for keys a config.json omits.
VAE_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# transformers' CLIPTextConfig defaults: what it uses for keys a config.json omits.
CLIP_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
# transformers' CLIPVisionConfig defaults (OpenAI ViT-B/32's vision tower).
CLIP_VISION_TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}
CLIP_MODEL_PROJECTION_DIM = 512  # transformers' CLIPConfig.projection_dim default

# UNet2DConditionModel settings we implement only at one value: (key, allowed, diffusers default).
_UNET_FIXED: tuple[tuple[str, Any, Any], ...] = (
    ("act_fn", "silu", "silu"),
    ("time_embedding_type", "positional", "positional"),
    ("class_embed_type", None, None),
    ("num_class_embeds", None, None),
    ("encoder_hid_dim", None, None),
    ("resnet_time_scale_shift", "default", "default"),
    ("center_input_sample", False, False),
    ("use_linear_projection", True, False),
    ("dual_cross_attention", False, False),
    ("only_cross_attention", (False,), False),
    ("time_cond_proj_dim", None, None),
    ("timestep_post_act", None, None),
    ("time_embedding_dim", None, None),
    ("conv_in_kernel", 3, 3),
    ("conv_out_kernel", 3, 3),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
    ("attention_type", "default", "default"),
    ("class_embeddings_concat", False, False),
    ("cross_attention_norm", None, None),
    ("reverse_transformer_layers_per_block", None, None),
    ("mid_block_scale_factor", (1, 1.0), 1),
    ("addition_embed_type", (None, "text_time"), None),
)


# -- UNet (diffusers UNet2DConditionModel) -------------------------------------------------------
def _unet_check_fixed(d: dict[str, Any]) -> None:
    for key, ok, default in _UNET_FIXED:
        value = d.get(key, default)
        allowed = ok if isinstance(ok, tuple) else (ok,)
        if value not in allowed:
            raise ValueError(
                f"unet/config.json: {key}={value!r} is not supported (supported: {allowed})"
            )


def _unet_attention_levels(d: dict[str, Any]) -> list[bool]:
    """Which levels have cross-attention, from the block types (the up blocks must mirror)."""
    has_attn = []
    for t in d["down_block_types"]:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"unet/config.json: down block {t!r} is not supported")
        has_attn.append(t == "CrossAttnDownBlock2D")
    expect_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
    if list(d["up_block_types"]) != expect_up:
        raise ValueError(
            f"unet/config.json: up_block_types {d['up_block_types']} must mirror the down "
            f"blocks ({expect_up})"
        )
    return has_attn


def _unet_per_level(d: dict[str, Any], key: str, default: Any, n: int) -> list[Any]:
    v = d.get(key, default)
    v = [v] * n if isinstance(v, int) or v is None else list(v)
    if len(v) != n:
        raise ValueError(f"unet/config.json: {key} needs {n} entries, got {v}")
    return v


def unet_from_reference(d: dict[str, Any]) -> UNetConfig:
    """From a diffusers ``UNet2DConditionModel`` config.json; refuses what we lack."""
    _unet_check_fixed(d)
    has_attn = _unet_attention_levels(d)
    n = len(has_attn)
    lpb = _unet_per_level(d, "layers_per_block", 2, n)
    tlpb = _unet_per_level(d, "transformer_layers_per_block", 1, n)
    if any(not isinstance(x, int) for x in tlpb):
        raise ValueError("unet/config.json: nested transformer_layers_per_block is not supported")
    heads_key = "num_attention_heads" if d.get("num_attention_heads") else "attention_head_dim"
    heads = _unet_per_level(d, heads_key, 8, n)
    ctx = d.get("cross_attention_dim", 1280)
    if not isinstance(ctx, int):
        if len(set(ctx)) != 1:
            raise ValueError(f"unet/config.json: per-level cross_attention_dim {ctx} unsupported")
        ctx = ctx[0]
    return UNetConfig(
        block_out_channels=tuple(d["block_out_channels"]),
        layers_per_block=tuple(lpb),
        transformer_depth=tuple(t if a else 0 for t, a in zip(tlpb, has_attn, strict=True)),
        mid_transformer_depth=tlpb[-1],
        num_heads=tuple(heads),
        cross_attention_dim=ctx,
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        addition_embed_type=d.get("addition_embed_type"),
        addition_time_embed_dim=d.get("addition_time_embed_dim") or 256,
        projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim") or 0,
        norm_num_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0),
        sample_size=d.get("sample_size") or 128,
    )


def unet_to_reference(cfg: UNetConfig) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config.json for this UNet."""
    depth = list(cfg.transformer_depth)
    if depth[-1] and depth[-1] != cfg.mid_transformer_depth:
        raise ValueError(
            "diffusers ties the mid block's depth to the last level's; this UNet "
            f"(last level {depth[-1]}, mid {cfg.mid_transformer_depth}) has no diffusers form"
        )
    # Attention-free levels still need an entry; the last one also sets the mid block.
    tlpb = [t or 1 for t in depth[:-1]] + [cfg.mid_transformer_depth]
    has_attn = [t > 0 for t in depth]
    lpb = list(cfg.layers_per_block)
    text_time = bool(cfg.addition_embed_type)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "addition_embed_type": cfg.addition_embed_type,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": cfg.addition_time_embed_dim if text_time else None,
        "attention_head_dim": list(cfg.num_heads),
        "block_out_channels": list(cfg.block_out_channels),
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": cfg.cross_attention_dim,
        "cross_attention_norm": None,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "in_channels": cfg.in_channels,
        "layers_per_block": lpb[0] if len(set(lpb)) == 1 else lpb,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": cfg.norm_eps,
        "norm_num_groups": cfg.norm_num_groups,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": cfg.out_channels,
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim
        if text_time
        else None,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": None,
        "sample_size": cfg.sample_size,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": tlpb,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "upcast_attention": False,
        "use_linear_projection": True,
    }


# -- VAE (diffusers AutoencoderKL) ----------------------------------------------------------------
def vae_from_reference(d: dict[str, Any]) -> VAEConfig:
    """From a diffusers ``AutoencoderKL`` ``config.json``; refuses what we do not implement."""
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"VAE config is for {name!r}; sdxl_jax implements only AutoencoderKL")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - set(VAE_DIFFUSERS_DEFAULTS))
    if unknown:
        raise ValueError(
            f"VAE config.json has settings sdxl_jax's AutoencoderKL does not implement: "
            f"{unknown}. Is it a different VAE class, or a newer diffusers? Remove them if "
            f"they hold diffusers' defaults."
        )
    d = {**VAE_DIFFUSERS_DEFAULTS, **d}
    levels = len(d["block_out_channels"])
    for key, want in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(d.pop(key))
        if types != [want] * levels:
            raise ValueError(
                f"VAE config {key}={types}: only {levels} x {want!r} (one per "
                f"block_out_channels entry) is implemented"
            )
    if d.pop("act_fn") != "silu":
        raise ValueError("VAE config act_fn: only 'silu' is implemented")
    for key in ("block_out_channels", "latents_mean", "latents_std", "sample_size"):
        if isinstance(d[key], list):
            d[key] = tuple(d[key])
    return VAEConfig(**d)


def vae_to_reference(cfg: VAEConfig) -> dict[str, Any]:
    """A complete diffusers ``config.json`` dict for ``AutoencoderKL``."""
    d: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
    }
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    levels = len(cfg.block_out_channels)
    d["down_block_types"] = ["DownEncoderBlock2D"] * levels
    d["up_block_types"] = ["UpDecoderBlock2D"] * levels
    d["act_fn"] = "silu"
    return d


# -- text encoders (transformers CLIPTextModel / CLIPTextModelWithProjection) ---------------------
def _clip_check(d: dict[str, Any]) -> None:
    arch = d.get("architectures") or []
    if len(arch) != 1 or arch[0] not in CLIP_ARCHITECTURES:
        raise ValueError(
            f"text encoder config.json has architectures={arch or None}; sdxl_jax implements "
            f'one of {CLIP_ARCHITECTURES}. Set "architectures" to the class the weights were '
            f"saved from."
        )
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(
            f"text encoder config.json has model_type={model_type!r}; expected "
            f"'clip_text_model' (a full CLIP config? save its text tower on its own)"
        )


def clip_from_reference(d: dict[str, Any]) -> CLIPTextConfig:
    """From a transformers ``config.json`` of a CLIPTextModel(WithProjection)."""
    _clip_check(d)
    with_proj = d["architectures"][0] == "CLIPTextModelWithProjection"
    proj = d.get("projection_dim", CLIP_TRANSFORMERS_DEFAULTS["projection_dim"])
    return _clip_text(d, proj if with_proj else None, "text encoder config.json")


def _no_dropout(d: dict[str, Any], where: str) -> None:
    for key in ("attention_dropout", "dropout"):
        if d.get(key):
            raise ValueError(f"{where} {key}={d[key]}: dropout is not implemented; set it to 0.0")


def _clip_text(d: dict[str, Any], projection_dim: int | None, where: str) -> CLIPTextConfig:
    d = {**CLIP_TRANSFORMERS_DEFAULTS, **d}
    _no_dropout(d, where)
    eos = d["eos_token_id"]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise ValueError(
            f"{where} eos_token_id={eos!r}: need a single integer (2 selects the legacy argmax "
            f"pooling)"
        )
    return CLIPTextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        max_position_embeddings=d["max_position_embeddings"],
        hidden_act=d["hidden_act"],
        layer_norm_eps=float(d["layer_norm_eps"]),
        projection_dim=projection_dim,
        eos_token_id=eos,
        bos_token_id=d["bos_token_id"],
        pad_token_id=d["pad_token_id"],
    )


def clip_vision_from_reference(
    d: dict[str, Any], projection_dim: int | None = None
) -> CLIPVisionConfig:
    """From a transformers ``CLIPVisionConfig`` dict (a CLIPModel's ``vision_config``); the
    projection width is CLIPConfig's, passed in (None: no projection)."""
    where = "CLIP config.json vision_config"
    d = {**CLIP_VISION_TRANSFORMERS_DEFAULTS, **d}
    _no_dropout(d, where)
    for key in ("image_size", "patch_size"):
        if not isinstance(d[key], int) or isinstance(d[key], bool):
            raise ValueError(
                f"{where} {key}={d[key]!r}: only square images and patches (one integer) are "
                f"implemented, as transformers' CLIPVisionEmbeddings assumes"
            )
    return CLIPVisionConfig(
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_channels=d["num_channels"],
        image_size=d["image_size"],
        patch_size=d["patch_size"],
        hidden_act=d["hidden_act"],
        layer_norm_eps=float(d["layer_norm_eps"]),
        projection_dim=projection_dim,
    )


def _sub_config(d: dict[str, Any], key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """``text_config`` / ``vision_config``, with the legacy ``*_config_dict`` applied as
    CLIPConfig applies it: completed with the class defaults, then laid over the other."""
    sub = dict(d.get(key) or {})
    legacy = d.get(f"{key}_dict")
    if legacy is not None:
        sub.update({**defaults, **legacy})
    return sub


def clip_model_from_reference(d: dict[str, Any]) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """From a transformers ``CLIPModel`` config.json: (text tower, vision tower), both projecting
    to CLIPConfig's ``projection_dim`` (the sub-configs' own ``projection_dim`` is unused there)."""
    model_type = d.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(
            f"CLIP config.json has model_type={model_type!r}; expected 'clip' (a transformers "
            f"CLIPModel folder with text_config and vision_config)"
        )
    proj = d.get("projection_dim", CLIP_MODEL_PROJECTION_DIM)
    text = _sub_config(d, "text_config", CLIP_TRANSFORMERS_DEFAULTS)
    vision = _sub_config(d, "vision_config", CLIP_VISION_TRANSFORMERS_DEFAULTS)
    return (
        _clip_text(text, proj, "CLIP config.json text_config"),
        clip_vision_from_reference(vision, proj),
    )


def clip_to_reference(cfg: CLIPTextConfig) -> dict[str, Any]:
    """A transformers ``config.json`` dict (``remat``/``attention_impl`` are ours only)."""
    with_proj = cfg.projection_dim is not None
    return {
        "architectures": [CLIP_ARCHITECTURES[with_proj]],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        # Unused without a projection; the SDXL CLIP-L config.json has hidden_size there too.
        "projection_dim": cfg.projection_dim if with_proj else cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
