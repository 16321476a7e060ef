"""The four SDXL components: config class, module class, naming rules and config.json translators.

Each module class is ``Module(config, *, rngs, dtype, param_dtype)`` and keeps ``self.config``;
``from_reference`` / ``to_reference`` translate its config to and from the reference library's
``config.json`` (``configs``), and ``rules`` names its parameters the reference way (``mapping``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel
from sdxl_jax.models.unet import UNet2DConditionModel, UNetConfig
from sdxl_jax.models.vae import AutoencoderKL, VAEConfig
from sdxl_jax.weights import configs
from sdxl_jax.weights.mapping import CLIP_RULES, UNET_RULES, VAE_RULES, NameRules


@dataclass(frozen=True)
class Component:
    name: str  # folder name in a diffusers checkpoint
    config_class: type
    model_class: type
    rules: NameRules
    weights_stem: str  # "diffusion_pytorch_model" (diffusers) or "model" (transformers)
    from_reference: Callable[..., Any]  # (config.json dict, where=file name) -> our config
    to_reference: Callable[[Any], dict[str, Any]]  # our config -> config.json dict

    def abstract(self, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        """The module with shapes only: nothing is allocated."""
        cls = self.model_class
        return nnx.eval_shape(
            lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
        )


_DIFFUSERS_STEM = "diffusion_pytorch_model"
_CLIP = dict(
    config_class=CLIPTextConfig,
    model_class=CLIPTextModel,
    rules=CLIP_RULES,
    weights_stem="model",
    from_reference=configs.clip_from_reference,
    to_reference=configs.clip_to_reference,
)

COMPONENTS: dict[str, Component] = {
    "unet": Component(
        "unet",
        UNetConfig,
        UNet2DConditionModel,
        UNET_RULES,
        _DIFFUSERS_STEM,
        configs.unet_from_reference,
        configs.unet_to_reference,
    ),
    "vae": Component(
        "vae",
        VAEConfig,
        AutoencoderKL,
        VAE_RULES,
        _DIFFUSERS_STEM,
        configs.vae_from_reference,
        configs.vae_to_reference,
    ),
    "text_encoder": Component("text_encoder", **_CLIP),
    "text_encoder_2": Component("text_encoder_2", **_CLIP),
}
