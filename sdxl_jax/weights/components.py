"""The four SDXL components: which config, module and naming rules each uses.

Each model module provides a frozen config dataclass with ``from_reference(dict)`` (a diffusers
or transformers ``config.json``) and ``to_reference() -> dict``, a module class
``Module(config, *, rngs, dtype, param_dtype)`` that keeps ``self.config``, and a ``NameRules``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sdxl_jax.weights.mapping import NameRules


@dataclass(frozen=True)
class Component:
    name: str  # folder name in a diffusers checkpoint
    module: str  # python module holding the classes
    config_cls: str
    model_cls: str
    rules: str  # NameRules constant in that module
    weights_stem: str  # "diffusion_pytorch_model" (diffusers) or "model" (transformers)

    def _get(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.module), attr)

    @property
    def config_class(self) -> type:
        return self._get(self.config_cls)

    @property
    def model_class(self) -> type:
        return self._get(self.model_cls)

    def name_rules(self, config: Any) -> NameRules:
        rules = self._get(self.rules)
        return rules(config) if callable(rules) else rules

    def abstract(self, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        """The module with shapes only: nothing is allocated."""
        cls = self.model_class
        return nnx.eval_shape(
            lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
        )


COMPONENTS: dict[str, Component] = {
    "unet": Component(
        "unet",
        "sdxl_jax.models.unet",
        "UNetConfig",
        "UNet2DConditionModel",
        "UNET_RULES",
        "diffusion_pytorch_model",
    ),
    "vae": Component(
        "vae",
        "sdxl_jax.models.vae",
        "VAEConfig",
        "AutoencoderKL",
        "VAE_RULES",
        "diffusion_pytorch_model",
    ),
    "text_encoder": Component(
        "text_encoder",
        "sdxl_jax.models.clip",
        "CLIPTextConfig",
        "CLIPTextModel",
        "CLIP_RULES",
        "model",
    ),
    "text_encoder_2": Component(
        "text_encoder_2",
        "sdxl_jax.models.clip",
        "CLIPTextConfig",
        "CLIPTextModel",
        "CLIP_RULES",
        "model",
    ),
}
