"""What a checkpoint holds, from its configs alone: bad checkpoints fail before any weight is
read or anything compiles. Used by sampling (``generate``) and by training (frozen parts,
``init_from``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sdxl_jax.diffusion.schedule import NoiseSchedule
from sdxl_jax.diffusion.scheduler_config import SAMPLER_CLASSES
from sdxl_jax.weights import diffusers_io, formats, single_file
from sdxl_jax.weights.safetensors_io import TensorSource

# diffusers scheduler classes -> our sampler names (a checkpoint's default sampler).
SCHEDULER_SAMPLERS = {cls: sampler for sampler, cls in SAMPLER_CLASSES.items()}


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """What a checkpoint holds, from its configs alone."""

    path: Path
    fmt: str  # "diffusers" | "single-file"
    role: str  # "base" | "refiner"
    components: tuple[str, ...]
    configs: dict[str, Any]
    force_zeros_for_empty_prompt: bool
    schedule: NoiseSchedule


def role_of(configs: dict[str, Any]) -> str:
    """base (6 micro-conditioning numbers) or refiner (5), from the UNet's vector width."""
    unet, g = configs["unet"], configs.get("text_encoder_2")
    if g is None or g.projection_dim is None:
        raise ValueError("text_encoder_2 must be a CLIPTextModelWithProjection (pooled output)")
    n = (unet.projection_class_embeddings_input_dim - g.projection_dim) / max(
        unet.addition_time_embed_dim, 1
    )
    if n == 6:
        return "base"
    if n == 5:
        return "refiner"
    raise ValueError(
        f"UNet vector conditioning is {unet.projection_class_embeddings_input_dim} wide: "
        f"neither SDXL base (pooled + 6 x {unet.addition_time_embed_dim}) nor refiner (+ 5 x)"
    )


def check_stage(path: str | Path, *, need_vae: bool = True) -> StageInfo:
    """Read a checkpoint's configs and check it has every part sampling needs."""
    path = Path(path)
    fmt = formats.detect(path)
    if fmt == "single-file":
        source = TensorSource.open(path)
        layout = single_file.detect_layout(source.keys(), source)
        components = tuple(layout.prefixes)
        configs = {c: layout.config(c) for c in components}
        role = layout.kind
        force_zeros = role == "base"
        schedule = NoiseSchedule()
    else:
        components = tuple(
            c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (path / c).is_dir()
        )
        configs = {c: diffusers_io.read_config(path, c) for c in components}
        index = path / "model_index.json"
        meta = json.loads(index.read_text()) if index.exists() else {}
        role = None
        schedule = NoiseSchedule.from_checkpoint(path)
    for part in ("unet", "text_encoder_2"):
        if part not in components:
            raise ValueError(f"{path} has no {part}: sampling needs a UNet and both text encoders")
    role = role or role_of(configs)
    if fmt != "single-file":
        force_zeros = bool(meta.get("force_zeros_for_empty_prompt", role == "base"))
    if role == "base" and "text_encoder" not in components:
        raise ValueError(f"{path} is an SDXL base without text_encoder/ (CLIP-L)")
    if need_vae and "vae" not in components:
        raise ValueError(f"{path} has no VAE: pass a checkpoint with vae/ (or --vae PATH)")
    return StageInfo(path, fmt, role, components, configs, force_zeros, schedule)


def check_vae(path: str | Path) -> Any:
    """The VAE config of a checkpoint (a diffusers folder with vae/, or a single file)."""
    path = Path(path)
    if formats.detect(path) == "single-file":
        source = TensorSource.open(path)
        layout = single_file.detect_layout(source.keys(), source)
        if "vae" not in layout.prefixes:
            raise ValueError(f"{path} holds no VAE (no first_stage_model.* keys)")
        return layout.config("vae")
    if not (path / "vae").is_dir():
        raise ValueError(f"{path} has no vae/ folder")
    return diffusers_io.read_config(path, "vae")


def default_sampler(path: str | Path) -> str:
    """The sampler of a checkpoint's ``scheduler/scheduler_config.json`` (euler if none)."""
    cfg = Path(path) / "scheduler" / "scheduler_config.json"
    if cfg.exists():
        name = json.loads(cfg.read_text()).get("_class_name")
        return SCHEDULER_SAMPLERS.get(name, "euler")
    return "euler"
