"""A transformers ``CLIPModel`` folder: ``config.json`` (``text_config``, ``vision_config``,
``projection_dim``), ``model.safetensors`` (or shards with an index), the tokenizer files and
``preprocessor_config.json``. Both towers come from the one weights file, each reading only the
keys under its prefixes (``logit_scale`` is read by neither)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sdxl_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from sdxl_jax.weights import configs
from sdxl_jax.weights.config_checks import read_json_object
from sdxl_jax.weights.diffusers_io import find_weights
from sdxl_jax.weights.loader import ShardingFn, Source, load_module
from sdxl_jax.weights.mapping import (
    CLIP_MODEL_TEXT_PREFIXES,
    CLIP_MODEL_TEXT_RULES,
    CLIP_MODEL_VISION_PREFIXES,
    CLIP_MODEL_VISION_RULES,
)
from sdxl_jax.weights.safetensors_io import TensorSource

WEIGHTS_STEM = "model"  # model.safetensors / model.safetensors.index.json


class _Only:
    """A source seen through the keys that start with one of ``prefixes``."""

    def __init__(self, source: Source, prefixes: tuple[str, ...]):
        self.source, self.prefixes = source, prefixes
        self.description = source.description

    def keys(self) -> list[str]:
        return [k for k in self.source.keys() if k.startswith(self.prefixes)]

    def __contains__(self, key: str) -> bool:
        return key.startswith(self.prefixes) and key in self.source

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(key)

    def read(self, key: str) -> Any:
        return self.source.read(key)


def check_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, if it is a directory holding a ``config.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a directory; expected a transformers CLIPModel folder (config.json, "
            f"model.safetensors, tokenizer files, preprocessor_config.json)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; expected a transformers CLIPModel folder (config.json "
            f"with text_config and vision_config, model.safetensors, tokenizer, "
            f"preprocessor_config.json)"
        )
    return folder


def read_clip_model_config(folder: str | Path) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The two towers' configs from a CLIPModel folder's ``config.json``."""
    folder = check_folder(folder)
    path = folder / "config.json"
    return configs.clip_model_from_reference(read_json_object(path), where=str(path))


def find_clip_weights(folder: str | Path) -> TensorSource:
    """``model.safetensors`` (or its sharded index); pickles (``pytorch_model.bin``) refused."""
    return find_weights(check_folder(folder), WEIGHTS_STEM)


def load_clip_model(
    folder: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    sharding: ShardingFn | None = None,
) -> tuple[CLIPTextModel, CLIPVisionModel]:
    """(text tower with ``text_projection``, vision tower with ``visual_projection``) of a
    transformers ``CLIPModel`` folder; every tensor is checked before any is read."""
    text_cfg, vision_cfg = read_clip_model_config(folder)
    source = find_clip_weights(folder)
    out = []
    for cls, cfg, rules, prefixes, name in (
        (CLIPTextModel, text_cfg, CLIP_MODEL_TEXT_RULES, CLIP_MODEL_TEXT_PREFIXES, "CLIP text"),
        (
            CLIPVisionModel,
            vision_cfg,
            CLIP_MODEL_VISION_RULES,
            CLIP_MODEL_VISION_PREFIXES,
            "CLIP vision",
        ),
    ):
        abstract = nnx.eval_shape(
            lambda cls=cls, cfg=cfg: cls(
                cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype
            )
        )
        view = _Only(source, prefixes)
        out.append(load_module(abstract, view, rules, component=name, sharding=sharding))
    text, vision = out
    return text, vision
