"""LoRA files: kohya's format (ComfyUI, A1111, diffusers read it) and diffusers / PEFT's.

Written:

- **kohya** (one ``.safetensors``): ``lora_unet_<sgm module path, dots as _>`` (the names
  kohya's sd-scripts writes for SDXL, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_
  attn1_to_q``), ``lora_te1_text_model_...`` (CLIP-L), ``lora_te2_text_model_...`` (bigG), each
  with ``.lora_down.weight`` [r, in] (conv [r, in, kh, kw]), ``.lora_up.weight`` [out, r]
  (conv [out, r, 1, 1]) and a 0-d ``.alpha``; the ``ss_*`` / ``modelspec.*`` metadata kohya
  writes.
- **peft** (``pytorch_lora_weights.safetensors``, what ``pipe.save_lora_weights`` writes):
  ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.`` /
  ``text_encoder_2.`` for the text encoders, rank and alpha in the ``lora_adapter_metadata``
  JSON that diffusers reads back (``<prefix>.r``, ``<prefix>.lora_alpha``, ``alpha_pattern``).

Read: both, kohya with sgm or diffusers block names, ``lora_down/up`` or ``lora_A/B``, ``.alpha``
present or not (absent: alpha = rank), PEFT with or without the ``unet.`` prefix. Names are
resolved through tables of every linear / conv layer of the models at hand (never parsed), so
a file for another architecture is refused naming its first unknown or mismatched module.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from sdxl_jax.models import lora as lora_lib
from sdxl_jax.models.layers import Conv, Linear
from sdxl_jax.weights.diffusers_io import refuse_pickle
from sdxl_jax.weights.mapping import CLIP_RULES, UNET_RULES, param_entries
from sdxl_jax.weights.safetensors_io import SafetensorsFile, spec_of, write_safetensors
from sdxl_jax.weights.sgm_unet import sgm_name

COMPONENTS = ("unet", "te1", "te2")
KOHYA_PREFIX = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
PEFT_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
PEFT_FILE = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One adaptable layer of a model and its names in the file formats."""

    component: str
    target: lora_lib.Target
    reference: str  # diffusers / transformers module name
    sgm: str | None  # the sgm single-file module name (UNet only)
    kernel: tuple[int, ...]  # our per-layer kernel shape ([in, out] or [kh, kw, in, out])

    @property
    def kohya(self) -> str:
        name = self.sgm if self.sgm is not None else self.reference
        return KOHYA_PREFIX[self.component] + name.replace(".", "_")

    @property
    def module(self) -> str:
        """The module's name in the model diffusers loads (transformers 5's CLIPTextModel has
        no ``text_model.`` level)."""
        return (
            self.reference
            if self.component == "unet"
            else self.reference.removeprefix("text_model.")
        )

    @property
    def peft(self) -> str:
        return f"{PEFT_PREFIX[self.component]}.{self.module}"


def layers_of(component: str, model: nnx.Module) -> list[Layer]:
    """Every linear and conv layer of ``model`` (concrete or abstract, without adapters)."""
    if component not in COMPONENTS:
        raise ValueError(f"LoRA component {component!r}: use one of {COMPONENTS}")
    rules = UNET_RULES if component == "unet" else CLIP_RULES
    entries = {e.path: e for e in param_entries(model, rules)}
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (Linear, Conv)):
            continue
        entry = entries[(*path, "kernel")]
        for i, key in enumerate(entry.keys):
            reference = key.removesuffix(".weight")
            sgm = None
            if component == "unet":
                sgm = sgm_name(key, model.config).key.removesuffix(".weight")
            shape = entry.shape[1:] if entry.stacked else entry.shape
            target = (tuple(path), i if entry.stacked else None)
            out.append(Layer(component, target, reference, sgm, tuple(shape)))
    return out


@dataclasses.dataclass
class LoadedLoRA:
    """A LoRA file read for the given models: adapters per component, in our layouts."""

    path: Path
    format: str  # "kohya" | "peft"
    adapters: dict[str, lora_lib.Adapters]
    skipped: list[str]  # module keys nothing in the models matched (non-strict reads)
    metadata: dict[str, str]


# -- writing -------------------------------------------------------------------------------


def _torch_layout(adapter: lora_lib.Adapter, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    down = np.asarray(adapter.down, np.float32)
    up = np.asarray(adapter.up, np.float32)
    if down.ndim == 4:  # conv: HWIO [kh, kw, in, r] -> [r, in, kh, kw]; up -> [out, r, 1, 1]
        return down.transpose(3, 2, 0, 1).astype(dtype), up.T[:, :, None, None].astype(dtype)
    return down.T.astype(dtype), up.T.astype(dtype)


def kohya_metadata(adapters: Mapping[str, lora_lib.Adapters]) -> dict[str, str]:
    """The metadata kohya's sd-scripts writes for an SDXL LoRA (what A1111 / ComfyUI show)."""
    every = [a for per in adapters.values() for a in per.values()]
    ranks = Counter(a.rank for a in every)
    alphas = Counter(a.alpha for a in every)
    dim = ranks.most_common(1)[0][0] if ranks else 0
    alpha = alphas.most_common(1)[0][0] if alphas else 0
    convs = [a for a in every if np.ndim(a.down) == 4]
    args = {"conv_dim": str(convs[0].rank), "conv_alpha": str(convs[0].alpha)} if convs else {}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_text_encoder_lr": "None" if not ({"te1", "te2"} & set(adapters)) else "",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "sdxl_jax LoRA",
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.prediction_type": "epsilon",
    }


def _peft_metadata(
    adapters: Mapping[str, lora_lib.Adapters], names: Mapping[str, dict]
) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata``: per prefix PEFT's LoraConfig fields (r,
    lora_alpha, target_modules, rank/alpha patterns for the layers that differ)."""
    meta: dict[str, Any] = {}
    for component, per in adapters.items():
        if not per:
            continue
        prefix = PEFT_PREFIX[component]
        by_name = {names[component][t].module: a for t, a in per.items()}
        r = Counter(a.rank for a in by_name.values()).most_common(1)[0][0]
        alpha = Counter(a.alpha for a in by_name.values()).most_common(1)[0][0]
        meta[f"{prefix}.r"] = r
        meta[f"{prefix}.lora_alpha"] = alpha
        meta[f"{prefix}.target_modules"] = sorted(by_name)
        meta[f"{prefix}.rank_pattern"] = {n: a.rank for n, a in by_name.items() if a.rank != r}
        meta[f"{prefix}.alpha_pattern"] = {
            n: a.alpha for n, a in by_name.items() if a.alpha != alpha
        }
    return meta


def save(
    path: str | Path,
    adapters: Mapping[str, lora_lib.Adapters],
    models: Mapping[str, nnx.Module],
    *,
    format: str = "kohya",
    dtype: str = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapters`` (per component: "unet", "te1", "te2") as one LoRA file; returns it.

    ``models``: the components' models (abstract is enough, without adapters), for the names.
    peft: ``path`` is a folder (the file is ``pytorch_lora_weights.safetensors`` in it) or a
    ``.safetensors`` path."""
    if format not in ("kohya", "peft"):
        raise ValueError(f"LoRA format {format!r}: use kohya or peft")
    if dtype not in DTYPES:
        raise ValueError(f"LoRA dtype {dtype!r}: use one of {list(DTYPES)}")
    np_dtype = DTYPES[dtype]
    path = Path(path)
    if format == "peft" and path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / PEFT_FILE
    names = {c: {x.target: x for x in layers_of(c, models[c])} for c in adapters}
    tensors = {}
    for component, per in adapters.items():
        lora_lib.check_shapes(models[component], per)
        for target, adapter in per.items():
            layer = names[component][target]
            down, up = _torch_layout(adapter, np_dtype)
            if format == "kohya":
                tensors[f"{layer.kohya}.lora_down.weight"] = spec_of(down)
                tensors[f"{layer.kohya}.lora_up.weight"] = spec_of(up)
                tensors[f"{layer.kohya}.alpha"] = spec_of(np.asarray(adapter.alpha, np_dtype))
            else:
                tensors[f"{layer.peft}.lora_A.weight"] = spec_of(down)
                tensors[f"{layer.peft}.lora_B.weight"] = spec_of(up)
    if format == "kohya":
        meta = {**kohya_metadata(adapters), **(metadata or {})}
    else:
        peft = _peft_metadata(adapters, names)
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(peft, sort_keys=True)}
        meta |= dict(metadata or {})
    write_safetensors(path, tensors, meta)
    return path


# -- reading -------------------------------------------------------------------------------


def open_lora(path: str | Path) -> SafetensorsFile:
    """The LoRA's safetensors file (a folder: its ``pytorch_lora_weights.safetensors``);
    pickles refused."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / PEFT_FILE] + sorted(path.glob("*.safetensors"))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                refuse_pickle(pickles[0])
            raise FileNotFoundError(f"{path}: no LoRA .safetensors file in this folder")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(2)
    if path.suffix in PICKLE_SUFFIXES or head[:1] == b"\x80" or head == b"PK":
        refuse_pickle(path)
    return SafetensorsFile(path)


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _lookup(layers: Iterable[Layer]) -> dict[str, Layer]:
    table: dict[str, Layer] = {}
    for layer in layers:
        table[layer.kohya] = layer
        table[KOHYA_PREFIX[layer.component] + layer.reference.replace(".", "_")] = layer
        table[layer.peft] = layer
        table[f"{PEFT_PREFIX[layer.component]}.{layer.reference}"] = layer  # older transformers
        if layer.component == "unet":
            table[layer.reference] = layer  # PEFT keys without the unet. prefix
    return table


def _peft_alphas(meta: Mapping[str, str]) -> dict[str, float]:
    """module name (with prefix) or prefix -> alpha, from diffusers' adapter metadata."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, float] = {}
    for prefix in PEFT_PREFIX.values():
        if f"{prefix}.lora_alpha" in info:
            out[prefix] = float(info[f"{prefix}.lora_alpha"])
        for name, alpha in (info.get(f"{prefix}.alpha_pattern") or {}).items():
            out[f"{prefix}.{name}"] = float(alpha)
    return out


def _ours(layer: Layer, down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch layouts -> ours, for the layer's kernel (linear or conv, 1x1 either way)."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    conv = len(layer.kernel) == 4
    if up.ndim == 4:
        up = up[:, :, 0, 0]
    if conv:
        if down.ndim == 2:
            down = down[:, :, None, None]
        return down.transpose(2, 3, 1, 0), up.T
    if down.ndim == 4:
        down = down[:, :, 0, 0]
    return down.T, up.T


def load(path: str | Path, models: Mapping[str, nnx.Module], *, strict: bool = True) -> LoadedLoRA:
    """Read a LoRA file for ``models`` ({"unet": ..., "te1": ..., "te2": ...}, abstract is
    enough, without adapters). Everything is checked before anything is returned: unknown
    modules (strict: an error listing them; else skipped and counted), shapes (an error naming
    the file key and both shapes), ranks larger than the layer."""
    f = open_lora(path)
    keys = f.keys()
    kohya = any(k.startswith("lora_") for k in keys)
    peft = any(".lora_A." in k or ".lora_B." in k for k in keys)
    if kohya and peft:
        raise ValueError(f"{f.path}: mixes kohya (lora_*) and PEFT (lora_A/B) keys")
    fmt = "kohya" if kohya or not peft else "peft"
    table = _lookup(x for c, m in models.items() for x in layers_of(c, m))
    modules: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        modules.setdefault(split[0], {})[split[1]] = key
    skipped = [m for m in modules if m not in table] + unknown
    # Shapes first: a LoRA for another architecture (SD 1.5, the refiner) usually shares some
    # module names, and the first mismatched one with both shapes says more than a name list.
    alphas = _peft_alphas(f.metadata)
    adapters: dict[str, lora_lib.Adapters] = {c: {} for c in models}
    for name, parts in modules.items():
        if name not in table:
            continue
        layer = table[name]
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"{f.path}: {name} has {sorted(parts)} but needs both down and up")
        down, up = _ours(layer, f.read(parts["down"]), f.read(parts["up"]))
        rank = down.shape[-1]
        got = (*down.shape[:-1], up.shape[-1])
        if up.shape[0] != rank or got != layer.kernel:
            raise ValueError(
                f"{f.path}: {name} does not fit the model: its layer {layer.reference} is "
                f"{_torch_shape(layer.kernel)} (out, in[, kh, kw]) but the LoRA's down is "
                f"{list(f.tensors[parts['down']].shape)} and up "
                f"{list(f.tensors[parts['up']].shape)}: a LoRA for another architecture "
                "(SD 1.5, the refiner) or model?"
            )
        if rank > min(layer.kernel[-2], layer.kernel[-1]):
            raise ValueError(
                f"{f.path}: {name} has rank {rank}, larger than its layer "
                f"{_torch_shape(layer.kernel)}"
            )
        if "alpha" in parts:
            alpha = float(np.asarray(f.read(parts["alpha"]), np.float32))
        else:
            prefix = PEFT_PREFIX[layer.component]
            alpha = alphas.get(f"{prefix}.{layer.module}", alphas.get(prefix, float(rank)))
        adapters[layer.component][layer.target] = lora_lib.Adapter(down, up, alpha)
    if skipped and strict:
        raise ValueError(
            f"{f.path}: {len(skipped)} of its {len(modules) + len(unknown)} LoRA modules match "
            f"no layer of the model ({skipped[:5]}{' ...' if len(skipped) > 5 else ''}): a LoRA "
            "for another architecture (SD 1.5, the refiner)? --no-lora-strict skips them"
        )
    return LoadedLoRA(Path(f.path), fmt, {c: a for c, a in adapters.items() if a}, skipped,
                      dict(f.metadata))  # fmt: skip


def _torch_shape(kernel: tuple[int, ...]) -> list[int]:
    if len(kernel) == 4:
        kh, kw, i, o = kernel
        return [o, i, kh, kw]
    return [kernel[1], kernel[0]]
