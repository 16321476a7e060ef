"""Diffusers folders: ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, each a
``config.json`` plus safetensors (one file, or shards with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.config_checks import read_json_object
from sdxl_jax.weights.loader import ShardingFn, export_tensors, load_module
from sdxl_jax.weights.safetensors_io import TensorSource, write_sharded

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"{path} is a pickle checkpoint. Loading pickles can run arbitrary code, so sdxl_jax "
        f"refuses them. Convert it once, in an environment you trust, to safetensors: "
        f'`python -c "import torch, safetensors.torch as st; '
        f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
        f"sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous() for k, v in sd.items() "
        f"if hasattr(v, 'contiguous')}}, '{path.stem}.safetensors')\"`."
    )


def find_weights(folder: Path, stem: str, variant: str | None = None) -> TensorSource:
    """The safetensors (or sharded index) of one component folder; a variant like ``fp16``
    is used when asked for, or when it is the only one there."""
    names = [f"{stem}.safetensors.index.json", f"{stem}.safetensors"]
    variants = (
        [f"{stem}.{variant}.safetensors.index.json", f"{stem}.{variant}.safetensors"]
        if variant
        else []
    )
    for name in variants or names:
        if (folder / name).exists():
            return TensorSource.open(folder / name)
    if not variant:
        found = sorted(folder.glob(f"{stem}.*.safetensors*"))
        found = [p for p in found if not p.name.startswith(f"{stem}-")]
        if found:
            index = [p for p in found if p.name.endswith(".index.json")]
            return TensorSource.open(index[0] if index else found[0])
    pickles = (
        [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
    )
    if pickles:
        refuse_pickle(pickles[0])
    want = variants or names
    raise FileNotFoundError(f"{folder}: no weights found (looked for {', '.join(want)})")


def read_config(folder: Path, name: str) -> Any:
    comp = COMPONENTS[name]
    path = folder / name / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no {name}/config.json: not a diffusers SDXL folder?")
    return comp.from_reference(read_json_object(path), where=str(path))


def load_component(
    folder: str | Path,
    name: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    sharding: ShardingFn | None = None,
    variant: str | None = None,
    progress: bool = False,
) -> nnx.Module:
    """Load one component of a diffusers folder; its config comes from its ``config.json``."""
    folder = Path(folder)
    comp = COMPONENTS[name]
    config = read_config(folder, name)
    source = find_weights(folder / name, comp.weights_stem, variant)
    abstract = comp.abstract(config, dtype=dtype, param_dtype=param_dtype)
    return load_module(
        abstract, source, comp.rules, component=name, sharding=sharding, progress=progress
    )


def save_component(
    module: nnx.Module,
    folder: str | Path,
    name: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
    progress: bool = False,
) -> None:
    """Write one component as ``<folder>/<name>/config.json`` plus safetensors."""
    comp = COMPONENTS[name]
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = comp.to_reference(module.config)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tensors = export_tensors(module, comp.rules, np.dtype(dtype) if dtype else None)
    write_sharded(
        out, comp.weights_stem, tensors, max_shard_bytes, {"format": "pt"}, progress=progress
    )
