"""One entry point for every checkpoint format: detect, load, save, describe."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdxl_jax.weights import diffusers_io, single_file
from sdxl_jax.weights.components import COMPONENTS
from sdxl_jax.weights.config_checks import read_json_object
from sdxl_jax.weights.loader import ShardingFn
from sdxl_jax.weights.safetensors_io import TensorSource

# Folders a diffusers pipeline keeps beside the models; copied through on export.
SIDE_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")


def detect(path: str | Path) -> str:
    """``"diffusers"`` (a folder), ``"single-file"`` (.safetensors); pickles are refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if any((path / c / "config.json").exists() for c in COMPONENTS):
            return "diffusers"
        raise ValueError(
            f"{path} is a folder without unet/, vae/, text_encoder/ or text_encoder_2/ "
            f"config.json: not a diffusers checkpoint"
        )
    if path.suffix in diffusers_io.PICKLE_SUFFIXES:
        diffusers_io.refuse_pickle(path)
    if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        return "single-file"
    raise ValueError(
        f"{path}: unknown checkpoint format (expected a diffusers folder or .safetensors)"
    )


def load(
    path: str | Path,
    components: Iterable[str] | None = None,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    sharding: ShardingFn | None = None,
    variant: str | None = None,
    progress: bool = False,
) -> dict[str, nnx.Module]:
    """Load the named components (default: all present) from any supported checkpoint."""
    path = Path(path)
    if detect(path) == "single-file":
        return single_file.load_single_file(
            path,
            components,
            dtype=dtype,
            param_dtype=param_dtype,
            sharding=sharding,
            progress=progress,
        )
    present = [c for c in COMPONENTS if (path / c / "config.json").exists()]
    wanted = list(components) if components is not None else present
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"{path} has no {missing[0]}/ (it has {present})")
    return {
        c: diffusers_io.load_component(
            path,
            c,
            dtype=dtype,
            param_dtype=param_dtype,
            sharding=sharding,
            variant=variant,
            progress=progress,
        )
        for c in wanted
    }


def save(
    models: dict[str, nnx.Module],
    out: str | Path,
    fmt: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
    copy_from: str | Path | None = None,
    progress: bool = False,
) -> None:
    """Write ``models`` as a diffusers folder or one single file (sgm layout)."""
    out = Path(out)
    if fmt == "single-file":
        out.parent.mkdir(parents=True, exist_ok=True)
        single_file.save_single_file(models, out, dtype, progress)
        return
    if fmt != "diffusers":
        raise ValueError(f"unknown format {fmt!r}: use diffusers or single-file")
    for name, module in models.items():
        diffusers_io.save_component(
            module, out, name, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress
        )
    src = Path(copy_from) if copy_from else None
    if src is not None and src.is_dir():
        for side in SIDE_FOLDERS:
            if (src / side).is_dir() and not (out / side).exists():
                shutil.copytree(src / side, out / side)
        if (src / "model_index.json").exists() and not (out / "model_index.json").exists():
            shutil.copy(src / "model_index.json", out / "model_index.json")


def _component_of(key: str, layout: single_file.Layout) -> str | None:
    for name, prefix in sorted(layout.prefixes.items(), key=lambda kv: -len(kv[1])):
        if key.startswith(prefix):
            return name
    return None


def describe(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds, from its headers alone (no tensor is read)."""
    path = Path(path)
    fmt = detect(path)
    comps: dict[str, dict[str, Any]] = {}

    def add(name: str, source: TensorSource, keys: Iterable[str]) -> None:
        entry = comps.setdefault(name, {"tensors": 0, "parameters": 0, "bytes": 0, "dtypes": {}})
        for k in keys:
            info = source.info(k)
            n = int(np.prod(info.shape, dtype=np.int64))
            entry["tensors"] += 1
            entry["parameters"] += n
            entry["bytes"] += info.nbytes
            dt = str(info.dtype)
            entry["dtypes"][dt] = entry["dtypes"].get(dt, 0) + 1

    result: dict[str, Any] = {"path": str(path), "format": fmt}
    if fmt == "diffusers":
        for name, comp in COMPONENTS.items():
            folder = path / name
            if not (folder / "config.json").exists():
                continue
            source = diffusers_io.find_weights(folder, comp.weights_stem)
            add(name, source, source.keys())
            comps[name]["source"] = source.description
            cfg = read_json_object(folder / "config.json")
            comps[name]["class"] = cfg.get("_class_name") or (cfg.get("architectures") or ["?"])[0]
        result["extras"] = [s for s in SIDE_FOLDERS if (path / s).is_dir()]
    else:
        source = TensorSource.open(path)
        layout = single_file.detect_layout(source.keys(), source)
        result["model"] = f"SDXL {layout.kind}"
        other = []
        for k in source.keys():
            name = _component_of(k, layout)
            if name is None:
                other.append(k)
            else:
                add(name, source, [k])
        if other:
            add("(other)", source, other)
        for name in layout.prefixes:  # the shapes it loads with: its own config, or SDXL's
            comps[name]["config"] = "stored in the file" if name in layout.stored else "SDXL preset"
        result["metadata"] = source.metadata
    result["components"] = comps
    return result
