"""Single-file SDXL checkpoints (sgm / A1111 / ComfyUI layout).

Single files carry no config.json: a file's components get SDXL's presets, except in our own
files, which store each component's reference config.json (a JSON object per component) in the
safetensors ``__metadata__`` under ``sdxl_jax.config``, so models of other shapes round-trip.

Each component's key mapping lives in its own module (``sgm_unet``, ``sgm_vae``, ``sgm_clip``) as a
function ``sgm_name(ref_key, config) -> SgmTensor`` from the reference (diffusers/transformers)
key to where the tensor lives in the single file (``sgm_tensor.SgmTensor``), relative to the
component's prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.weights import sgm_clip, sgm_unet, sgm_vae
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.loader import ShardingFn, export_tensors, load_module
from sdxl_jax.weights.mapping import param_entries
from sdxl_jax.weights.safetensors_io import TensorSource, TensorSpec, write_safetensors
from sdxl_jax.weights.sgm_tensor import SgmTensor

# -- layouts -------------------------------------------------------------------------------------


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX_BASE = "conditioner.embedders.1.model."
BIGG_PREFIX_REFINER = "conditioner.embedders.0.model."
# Buffers some files carry that hold no parameters.
IGNORED = ("position_ids", "logit_scale", "attn_mask")
# Whole prefixes some files carry that are not part of the model.
IGNORED_PREFIXES = ("denoiser.", "model_ema.", "cond_stage_model.")
CONFIG_KEY = "sdxl_jax.config"  # __metadata__ key: {component: reference config.json dict}


def sgm_mapper(name: str) -> Callable[[str, Any], SgmTensor]:
    """Component ``name``'s map from reference keys to where they live in a single file."""
    return {
        "unet": sgm_unet.sgm_name,
        "vae": sgm_vae.sgm_name,
        "text_encoder": sgm_clip.sgm_name_hf,
        "text_encoder_2": sgm_clip.sgm_name_openclip,
    }[name]


@dataclass(frozen=True)
class Layout:
    """Which SDXL model a single file holds, and where each component's tensors are."""

    kind: str  # "base" | "refiner"
    prefixes: dict[str, str]  # component -> key prefix
    stored: dict[str, Any] = field(default_factory=dict)  # configs the file itself holds

    def config(self, name: str) -> Any:
        """The file's own config for ``name`` if it stores one, else the SDXL preset."""
        if name in self.stored:
            return self.stored[name]
        from sdxl_jax.models.clip import CLIPTextConfig
        from sdxl_jax.models.unet import UNetConfig
        from sdxl_jax.models.vae import VAEConfig

        if name == "unet":
            return UNetConfig.sdxl_base() if self.kind == "base" else UNetConfig.sdxl_refiner()
        if name == "vae":
            return VAEConfig.sdxl()
        if name == "text_encoder":
            return CLIPTextConfig.clip_l()
        return CLIPTextConfig.open_clip_bigg()


def detect_layout(keys: Iterable[str], source: TensorSource | None = None) -> Layout:
    """Base or refiner, and the components present, from the keys alone."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    prefixes: dict[str, str] = {}
    if has(UNET_PREFIX):
        prefixes["unet"] = UNET_PREFIX
    elif has("input_blocks.0.0."):  # a bare UNet file (ComfyUI "diffusion model" export)
        prefixes["unet"] = ""
    if has(VAE_PREFIX):
        prefixes["vae"] = VAE_PREFIX
    if has(BIGG_PREFIX_REFINER):
        kind = "refiner"
        prefixes["text_encoder_2"] = BIGG_PREFIX_REFINER
    else:
        kind = "base"
        if has(CLIP_L_PREFIX):
            prefixes["text_encoder"] = CLIP_L_PREFIX
        if has(BIGG_PREFIX_BASE):
            prefixes["text_encoder_2"] = BIGG_PREFIX_BASE
    label = f"{prefixes.get('unet', '')}label_emb.0.0.weight"
    wide = source is not None and label in source and len(source.shape(label)) == 2
    if "text_encoder_2" not in prefixes and wide:
        # No text encoders to tell by: the vector-conditioning width does (2816 base, 2560 refiner).
        kind = "refiner" if source.shape(label)[1] == 2560 else "base"
    if not prefixes:
        raise ValueError(
            "not an SDXL single-file checkpoint: no keys under model.diffusion_model., "
            "first_stage_model. or conditioner.embedders.*"
        )
    return Layout(kind, prefixes, stored_configs(source) if source is not None else {})


def stored_configs(source: TensorSource) -> dict[str, Any]:
    """The configs a file of ours stores in its metadata (``{}`` for other files), checked as
    a config.json is."""
    text = source.metadata.get(CONFIG_KEY)
    if text is None:
        return {}
    where = f"{source.description}: __metadata__[{CONFIG_KEY!r}]"
    try:
        stored = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not JSON ({e})") from None
    if not isinstance(stored, dict) or not set(stored) <= set(COMPONENTS):
        raise ValueError(f"{where} is not an object of {', '.join(COMPONENTS)} configs")
    out = {}
    for name, d in stored.items():
        if not isinstance(d, dict):
            raise ValueError(f"{where} {name} is a {type(d).__name__}, not a config object")
        out[name] = COMPONENTS[name].from_reference(d, where=f"{where} {name}")
    return out


def config_metadata(models: dict[str, nnx.Module]) -> dict[str, str]:
    """``{CONFIG_KEY: JSON}`` of each component's reference config.json, for the metadata."""
    stored = {}
    for name, module in models.items():
        try:
            stored[name] = COMPONENTS[name].to_reference(module.config)
        except ValueError:
            continue  # no reference form (see unet_to_reference): that component gets a preset
    return {CONFIG_KEY: json.dumps(stored, sort_keys=True)} if stored else {}


class SgmSource:
    """A view of one component inside a single file, under reference (diffusers) key names."""

    def __init__(
        self, file: TensorSource, name: str, prefix: str, config: Any, ref_keys: list[str]
    ):
        self.description = f"{file.description} [{name}, prefix {prefix!r}]"
        self.file = file
        mapper = sgm_mapper(name)
        self.where = {k: mapper(k, config) for k in ref_keys}
        self.prefix = prefix
        self._keys = [k for k, t in self.where.items() if prefix + t.key in file]
        used = {prefix + t.key for t in self.where.values()}
        others = [c for c in (UNET_PREFIX, VAE_PREFIX, "conditioner.") if c != prefix]
        for k in file.keys():
            if not k.startswith(prefix) or k in used or k.endswith(IGNORED):
                continue
            if prefix == "" and (k.startswith(others) or k.startswith(IGNORED_PREFIXES)):
                continue
            self._keys.append(k)  # unexpected: reported under its own name

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        t = self.where.get(key)
        return self.prefix + t.key in self.file if t else key in self.file

    def shape(self, key: str) -> tuple[int, ...]:
        t = self.where.get(key)
        if t is None:
            return self.file.shape(key)
        shape = tuple(self.file.shape(self.prefix + t.key))
        if t.part >= 0:
            shape = (shape[0] // t.parts, *shape[1:])
        if t.squeeze:
            shape = shape[:2] if shape[2:] == (1, 1) else shape + ("<not 1x1>",)
        if t.transpose:
            shape = shape[::-1]
        return shape

    def read(self, key: str) -> np.ndarray:
        t = self.where[key]
        arr = self.file.read(self.prefix + t.key)
        if t.part >= 0:
            n = arr.shape[0] // t.parts
            arr = arr[t.part * n : (t.part + 1) * n]
        if t.squeeze:
            arr = arr.reshape(arr.shape[:2])
        if t.transpose:
            arr = np.ascontiguousarray(arr.T)
        return arr


def load_single_file(
    path: str | Path,
    components: Iterable[str] | None = None,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    sharding: ShardingFn | None = None,
    configs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, nnx.Module]:
    """Load the components of a single-file SDXL checkpoint (base or refiner, detected).

    Each component's config: ``configs[name]`` if given, else the one the file stores (our own
    exports), else the SDXL preset.
    """
    file = TensorSource.open(path)
    layout = detect_layout(file.keys(), file)
    wanted = list(components) if components is not None else list(layout.prefixes)
    out = {}
    for name in wanted:
        if name not in layout.prefixes:
            raise ValueError(
                f"{path} ({layout.kind} layout) holds no {name}; it holds {sorted(layout.prefixes)}"
            )
        comp = COMPONENTS[name]
        config = (configs or {}).get(name) or layout.config(name)
        abstract = comp.abstract(config, dtype=dtype, param_dtype=param_dtype)
        rules = comp.rules
        keys = [k for e in param_entries(abstract, rules) for k in e.keys]
        source = SgmSource(file, name, layout.prefixes[name], config, keys)
        out[name] = load_module(
            abstract, source, rules, component=name, sharding=sharding, progress=progress
        )
    return out


def single_file_tensors(models: dict[str, nnx.Module], dtype: Any = None) -> dict[str, TensorSpec]:
    """Our components as single-file tensors (sgm names), each produced when written."""
    refiner = "text_encoder_2" in models and "text_encoder" not in models
    prefixes = {
        "unet": UNET_PREFIX,
        "vae": VAE_PREFIX,
        "text_encoder": CLIP_L_PREFIX,
        "text_encoder_2": BIGG_PREFIX_REFINER if refiner else BIGG_PREFIX_BASE,
    }
    out: dict[str, TensorSpec] = {}
    for name, module in models.items():
        config = module.config
        mapper = sgm_mapper(name)
        tensors = export_tensors(module, COMPONENTS[name].rules, dtype)
        groups: dict[str, list[tuple[SgmTensor, TensorSpec]]] = {}
        for key, spec in tensors.items():
            t = mapper(key, config)
            groups.setdefault(prefixes[name] + t.key, []).append((t, spec))
        for key, parts in groups.items():
            parts.sort(key=lambda p: p[0].part)
            t0, s0 = parts[0]
            shape = list(s0.shape)
            if t0.part >= 0:
                if len(parts) != t0.parts:
                    raise ValueError(f"{key}: {len(parts)} of {t0.parts} parts")
                shape[0] *= t0.parts
            if t0.squeeze:
                shape += [1, 1]
            if t0.transpose:
                shape = shape[::-1]

            def produce(parts=parts, t0=t0) -> np.ndarray:
                arr = (
                    np.concatenate([s.produce() for _, s in parts])
                    if t0.part >= 0
                    else parts[0][1].produce()
                )
                if t0.squeeze:
                    arr = arr[:, :, None, None]
                if t0.transpose:
                    arr = arr.T
                return np.ascontiguousarray(arr)

            out[key] = TensorSpec(tuple(shape), s0.dtype, produce)
    return out


def save_single_file(
    models: dict[str, nnx.Module], path: str | Path, dtype: Any = None, progress: bool = False
) -> None:
    """Write components as one sgm-layout safetensors file (what A1111 / ComfyUI open)."""
    meta = {"format": "pt", **config_metadata(models)}
    write_safetensors(path, single_file_tensors(models, dtype), meta, progress)
