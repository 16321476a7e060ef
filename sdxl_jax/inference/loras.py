"""LoRAs for sampling: each file checked against the stages' configs before any weights load
(names, shapes, ranks), assigned to the stage it fits (base or refiner), merged into that
stage's weights once they are loaded (``W += scale * alpha / r * down @ up``)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdxl_jax.inference.checkpoints import StageInfo
from sdxl_jax.models import lora as lora_lib
from sdxl_jax.weights import lora_files
from sdxl_jax.weights.components import COMPONENTS

# Our component names -> the checkpoint's.
PARTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclasses.dataclass(frozen=True)
class StageLoRA:
    """One LoRA file read for one stage, with its scale."""

    loaded: lora_files.LoadedLoRA
    scale: float
    stage: str  # "base" | "refiner"

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.loaded.path.read_bytes()).hexdigest()[:12]
        return {"file": self.loaded.path.name, "sha256": digest, "scale": self.scale,
                "stage": self.stage, "format": self.loaded.format,
                "skipped_keys": len(self.loaded.skipped)}  # fmt: skip


def parse_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); the suffix is a scale only if it parses as one."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def abstract_models(info: StageInfo) -> dict[str, Any]:
    """The stage's UNet and text encoders with shapes only, for the LoRA name tables."""
    return {
        ours: COMPONENTS[part].abstract(info.configs[part])
        for ours, part in PARTS.items()
        if part in info.configs and info.configs[part] is not None
    }


def check(
    specs: Sequence[tuple[str | Path, float]],
    base: StageInfo,
    refiner: StageInfo | None = None,
    *,
    strict: bool = True,
) -> list[StageLoRA]:
    """Read each LoRA for the stage it fits: the base, else the refiner; else raise with the
    base's reason (the first mismatched or unknown module)."""
    stages = [("base", base)] + ([("refiner", refiner)] if refiner is not None else [])
    tables = {name: abstract_models(info) for name, info in stages}
    out = []
    for path, scale in specs:
        errors = []
        for name, _ in stages:
            try:
                loaded = lora_files.load(path, tables[name], strict=strict)
            except ValueError as e:
                errors.append(f"{name}: {e}")
                continue
            if not loaded.adapters:
                errors.append(f"{name}: {path}: no adapter matches this model")
                continue
            out.append(StageLoRA(loaded, float(scale), name))
            break
        else:
            raise ValueError(f"LoRA {path} fits no stage. " + " | ".join(errors))
    return out


def merge_into(models: dict[str, Any], loras: Sequence[StageLoRA]) -> None:
    """Merge ``loras`` into loaded components (``{"unet": ..., "text_encoder": ...}``), all
    shapes checked before the first merge."""
    pairs = []
    for lo in loras:
        for component, adapters in lo.loaded.adapters.items():
            model = models.get(PARTS[component])
            if model is None:
                raise ValueError(f"LoRA {lo.loaded.path} has {component} adapters: no such model")
            pairs.append((model, adapters, lo.scale))
    lora_lib.merge_all(pairs)
