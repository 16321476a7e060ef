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
from sdxl_jax.weights import config_checks as checks

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
UNET = "unet/config.json"
# UNet2DConditionModel's defaults for the keys that shape its levels.
_UNET_LEVELS_DEFAULT = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
}


def _unet_check_fixed(d: dict[str, Any], where: str) -> None:
    for key, ok, default in _UNET_FIXED:
        value = d.get(key, default)
        allowed = ok if isinstance(ok, tuple) else (ok,)
        if value not in allowed:
            raise ValueError(f"{where}: {key}={value!r} is not supported (supported: {allowed})")


def _unet_attention_levels(d: dict[str, Any], where: str) -> list[bool]:
    """Which levels have cross-attention, from the block types (the up blocks must mirror)."""
    down = d.get("down_block_types", _UNET_LEVELS_DEFAULT["down_block_types"])
    if not isinstance(down, list) or not down:
        raise ValueError(f"{where}: down_block_types={down!r}: need a non-empty list")
    has_attn = []
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"{where}: down block {t!r} is not supported")
        has_attn.append(t == "CrossAttnDownBlock2D")
    expect_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
    up = d.get("up_block_types", _UNET_LEVELS_DEFAULT["up_block_types"])
    if up != expect_up:
        raise ValueError(f"{where}: up_block_types {up} must mirror the down blocks ({expect_up})")
    return has_attn


def _unet_per_level(
    d: dict[str, Any], key: str, default: Any, n: int, where: str, lo: int = 1
) -> list[int]:
    v = d.get(key, default)
    if isinstance(v, list) and any(isinstance(x, list) for x in v):
        raise ValueError(f"{where}: nested {key} is not supported")
    v = [v] * n if not isinstance(v, list | tuple) else v
    return checks.counts(where, key, v, n, lo)


def unet_from_reference(d: dict[str, Any], where: str = UNET) -> UNetConfig:
    """From a diffusers ``UNet2DConditionModel`` config.json; refuses what we lack, and values
    no UNet can have, naming ``where`` (the file) and the key."""
    _unet_check_fixed(d, where)
    has_attn = _unet_attention_levels(d, where)
    n = len(has_attn)
    default_channels = _UNET_LEVELS_DEFAULT["block_out_channels"]
    channels = checks.counts(
        where, "block_out_channels", d.get("block_out_channels", default_channels), n
    )
    lpb = _unet_per_level(d, "layers_per_block", 2, n, where)
    tlpb = _unet_per_level(d, "transformer_layers_per_block", 1, n, where, lo=0)
    for t, a in zip(tlpb, has_attn, strict=True):
        if a and t < 1:
            raise ValueError(
                f"{where}: transformer_layers_per_block={tlpb}: a cross-attention level needs >= 1"
            )
    heads_key = "num_attention_heads" if d.get("num_attention_heads") else "attention_head_dim"
    heads = _unet_per_level(d, heads_key, 8, n, where)
    ctx = d.get("cross_attention_dim", 1280)
    if isinstance(ctx, list | tuple):
        if len(set(ctx)) != 1:
            raise ValueError(f"{where}: per-level cross_attention_dim {ctx} is not supported")
        ctx = ctx[0]
    text_time = d.get("addition_embed_type") == "text_time"
    vector = d.get("projection_class_embeddings_input_dim")
    get = d.get
    return checks.build(
        where,
        UNetConfig,
        block_out_channels=tuple(channels),
        layers_per_block=tuple(lpb),
        transformer_depth=tuple(t if a else 0 for t, a in zip(tlpb, has_attn, strict=True)),
        mid_transformer_depth=tlpb[-1],
        num_heads=tuple(heads),
        cross_attention_dim=checks.count(where, "cross_attention_dim", ctx),
        in_channels=checks.count(where, "in_channels", get("in_channels", 4)),
        out_channels=checks.count(where, "out_channels", get("out_channels", 4)),
        addition_embed_type=d.get("addition_embed_type"),
        addition_time_embed_dim=checks.count(
            where, "addition_time_embed_dim", get("addition_time_embed_dim") or 256
        ),
        projection_class_embeddings_input_dim=checks.count(
            where, "projection_class_embeddings_input_dim", vector, lo=1
        )
        if text_time
        else vector or 0,
        norm_num_groups=checks.count(where, "norm_num_groups", get("norm_num_groups", 32)),
        norm_eps=checks.number(where, "norm_eps", get("norm_eps", 1e-5), positive=True),
        flip_sin_to_cos=checks.flag(where, "flip_sin_to_cos", get("flip_sin_to_cos", True)),
        freq_shift=checks.number(where, "freq_shift", get("freq_shift", 0)),
        sample_size=checks.size(where, "sample_size", get("sample_size") or 128),
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
def vae_from_reference(d: dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
    """From a diffusers ``AutoencoderKL`` ``config.json``; refuses what we do not implement, and
    values no VAE can have, naming ``where`` (the file) and the key."""
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"{where}: the config is for {name!r}; sdxl_jax implements only "
                         f"AutoencoderKL")  # fmt: skip
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - set(VAE_DIFFUSERS_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{where}: settings sdxl_jax's AutoencoderKL does not implement: "
            f"{unknown}. Is it a different VAE class, or a newer diffusers? Remove them if "
            f"they hold diffusers' defaults."
        )
    d = {**VAE_DIFFUSERS_DEFAULTS, **d}
    channels = checks.counts(where, "block_out_channels", d["block_out_channels"])
    levels = len(channels)
    for key, want in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = d.pop(key)
        if types != [want] * levels:
            raise ValueError(
                f"{where}: {key}={types}: only {levels} x {want!r} (one per "
                f"block_out_channels entry) is implemented"
            )
    if d.pop("act_fn") != "silu":
        raise ValueError(f"{where}: act_fn: only 'silu' is implemented")
    latent = checks.count(where, "latent_channels", d["latent_channels"])
    kw: dict[str, Any] = {"block_out_channels": tuple(channels), "latent_channels": latent}
    for key in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        kw[key] = checks.count(where, key, d[key])
    kw["sample_size"] = checks.size(where, "sample_size", d["sample_size"])
    kw["scaling_factor"] = checks.number(where, "scaling_factor", d["scaling_factor"], True)
    shift = d["shift_factor"]
    kw["shift_factor"] = None if shift is None else checks.number(where, "shift_factor", shift)
    for key, positive in (("latents_mean", False), ("latents_std", True)):
        v = d[key]
        kw[key] = None if v is None else checks.numbers(where, key, v, latent, positive)
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        kw[key] = checks.flag(where, key, d[key])
    return checks.build(where, VAEConfig, **kw)


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
TEXT_ENCODER = "text encoder config.json"
_CLIP_SIZES = (  # (config.json key, our field): sizes and counts, each an integer >= 1
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
)


def _clip_check(d: dict[str, Any], where: str) -> None:
    arch = d.get("architectures") or []
    if not isinstance(arch, list) or len(arch) != 1 or arch[0] not in CLIP_ARCHITECTURES:
        raise ValueError(
            f"{where}: architectures={arch or None}; sdxl_jax implements "
            f'one of {CLIP_ARCHITECTURES}. Set "architectures" to the class the weights were '
            f"saved from."
        )
    model_type = d.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ValueError(
            f"{where}: model_type={model_type!r}; expected "
            f"'clip_text_model' (a full CLIP config? save its text tower on its own)"
        )


def clip_from_reference(d: dict[str, Any], where: str = TEXT_ENCODER) -> CLIPTextConfig:
    """From a transformers ``config.json`` of a CLIPTextModel(WithProjection); values no text
    encoder can have are refused, naming ``where`` (the file) and the key."""
    _clip_check(d, where)
    with_proj = d["architectures"][0] == "CLIPTextModelWithProjection"
    proj = d.get("projection_dim", CLIP_TRANSFORMERS_DEFAULTS["projection_dim"])
    return _clip_text(d, checks.count(where, "projection_dim", proj) if with_proj else None, where)


def _no_dropout(d: dict[str, Any], where: str) -> None:
    for key in ("attention_dropout", "dropout"):
        if d.get(key):
            raise ValueError(f"{where}: {key}={d[key]}: dropout is not implemented; set it to 0.0")


def _tower_sizes(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The sizes both towers share, checked, plus hidden_act and layer_norm_eps."""
    kw: dict[str, Any] = {ours: checks.count(where, key, d[key]) for key, ours in _CLIP_SIZES}
    kw["hidden_act"] = d["hidden_act"]
    kw["layer_norm_eps"] = checks.number(where, "layer_norm_eps", d["layer_norm_eps"], True)
    return kw


def _clip_text(d: dict[str, Any], projection_dim: int | None, where: str) -> CLIPTextConfig:
    d = {**CLIP_TRANSFORMERS_DEFAULTS, **d}
    _no_dropout(d, where)
    eos = d["eos_token_id"]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise ValueError(
            f"{where}: eos_token_id={eos!r}: need a single integer (2 selects the legacy argmax "
            f"pooling)"
        )
    return checks.build(
        where,
        CLIPTextConfig,
        **_tower_sizes(d, where),
        vocab_size=checks.count(where, "vocab_size", d["vocab_size"]),
        max_position_embeddings=checks.count(
            where, "max_position_embeddings", d["max_position_embeddings"]
        ),
        projection_dim=projection_dim,
        eos_token_id=eos,
        bos_token_id=d["bos_token_id"],
        pad_token_id=d["pad_token_id"],
    )


def clip_vision_from_reference(
    d: dict[str, Any],
    projection_dim: int | None = None,
    where: str = "CLIP config.json vision_config",
) -> CLIPVisionConfig:
    """From a transformers ``CLIPVisionConfig`` dict (a CLIPModel's ``vision_config``); the
    projection width is CLIPConfig's, passed in (None: no projection)."""
    d = {**CLIP_VISION_TRANSFORMERS_DEFAULTS, **d}
    _no_dropout(d, where)
    for key in ("image_size", "patch_size"):
        if not isinstance(d[key], int) or isinstance(d[key], bool):
            raise ValueError(
                f"{where}: {key}={d[key]!r}: only square images and patches (one integer) are "
                f"implemented, as transformers' CLIPVisionEmbeddings assumes"
            )
        checks.count(where, key, d[key])
    return checks.build(
        where,
        CLIPVisionConfig,
        **_tower_sizes(d, where),
        num_channels=checks.count(where, "num_channels", d["num_channels"]),
        image_size=d["image_size"],
        patch_size=d["patch_size"],
        projection_dim=projection_dim,
    )


def _sub_config(d: dict[str, Any], key: str, defaults: dict[str, Any], where: str) -> dict:
    """``text_config`` / ``vision_config``, with the legacy ``*_config_dict`` applied as
    CLIPConfig applies it: completed with the class defaults, then laid over the other."""
    sub, legacy = d.get(key) or {}, d.get(f"{key}_dict")
    for k, v in ((key, sub), (f"{key}_dict", legacy or {})):
        if not isinstance(v, dict):
            raise ValueError(f"{where}: {k} is a {type(v).__name__}, not an object of settings")
    sub = dict(sub)
    if legacy is not None:
        sub.update({**defaults, **legacy})
    return sub


def clip_model_from_reference(
    d: dict[str, Any], where: str = "CLIP config.json"
) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """From a transformers ``CLIPModel`` config.json: (text tower, vision tower), both projecting
    to CLIPConfig's ``projection_dim`` (the sub-configs' own ``projection_dim`` is unused there)."""
    model_type = d.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(
            f"{where}: model_type={model_type!r}; expected 'clip' (a transformers "
            f"CLIPModel folder with text_config and vision_config)"
        )
    proj = checks.count(where, "projection_dim", d.get("projection_dim", CLIP_MODEL_PROJECTION_DIM))
    text = _sub_config(d, "text_config", CLIP_TRANSFORMERS_DEFAULTS, where)
    vision = _sub_config(d, "vision_config", CLIP_VISION_TRANSFORMERS_DEFAULTS, where)
    return (
        _clip_text(text, proj, f"{where} text_config"),
        clip_vision_from_reference(vision, proj, f"{where} vision_config"),
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
