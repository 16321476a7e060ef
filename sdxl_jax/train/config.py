"""Stage configs: finding and loading a config file, model presets by name, and the checks that
must pass before anything compiles.

``load("experiments/base_256.py:tiny")`` runs the file's ``get_config("tiny")``, as
``python -m sdxl_jax.train --config`` does; a path ``experiments/<stage>.py`` that does not exist
from the current directory is the installed ``experiments`` package's file (``pip install .``
ships it), so the commands work from any directory.

``validate(config, n_devices)`` raises one clear message per problem (all of them at once): a
mesh larger than the devices, a global batch that does not split over the batch axes, bucket
sides the model cannot take (latent sides must divide by the UNet's total downsampling), an
impossible noise-level range.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sdxl_jax import sharding
from sdxl_jax.data import buckets
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.models import unet as unet_lib
from sdxl_jax.models.lora import GROUPS as LORA_GROUPS
from sdxl_jax.models.lora import LoRAConfig
from sdxl_jax.models.unet import UNetConfig
from sdxl_jax.models.vae import VAEConfig
from sdxl_jax.train import dreambooth

PREDICTION_TYPES = ("epsilon", "v_prediction")


def config_file(path: str) -> Path:
    """A stage config's file: ``path`` as given (absolute, or relative to the current directory),
    else for ``experiments/...`` the installed ``experiments`` package's file of that name."""
    p = Path(path)
    if p.is_file() or p.is_absolute() or p.parts[:1] != ("experiments",):
        return p
    spec = importlib.util.find_spec("experiments")  # finds the package, imports nothing
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root).joinpath(*p.parts[1:])
        if candidate.is_file():
            return candidate
    return p


def load(spec: str) -> Any:
    """``path.py[:arg]`` -> the file's ``get_config(arg)`` (``get_config()`` without ``arg``),
    the file found by :func:`config_file`; ``arg`` must be one of the file's ``VARIANTS``."""
    path, _, arg = spec.partition(":")
    file = config_file(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file; use experiments/<stage>.py[:arg]")
    module_spec = importlib.util.spec_from_file_location(f"stage_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    variants = getattr(module, "VARIANTS", None)
    if variants is not None and arg not in variants:
        raise ValueError(unknown_variant(path, arg, variants))
    return module.get_config(arg) if arg else module.get_config()


def unknown_variant(path: str, arg: str, variants: tuple[str, ...]) -> str:
    """The message for ``--config path:arg`` when the file has no variant ``arg``."""
    known = ", ".join(f"{path}:{v}" if v else f"{path} (full size)" for v in variants)
    return f"--config {path}:{arg}: {path} has no variant {arg!r}; use one of: {known}"


def unet_config(preset: str, **overrides: Any) -> UNetConfig:
    """``sdxl_base``, ``sdxl_refiner``, ``tiny``, ``tiny_refiner``, ``micro``, ``micro_refiner``
    (``sdxl_jax.models.unet.PRESETS``)."""
    return unet_lib.preset(preset, **overrides)


def vae_config(preset: str) -> VAEConfig:
    return VAEConfig.tiny() if preset.startswith("tiny") else VAEConfig.sdxl()


def latent_factor(preset: str) -> int:
    """Pixels per latent-grid step the UNet needs: VAE downscale x 2^(UNet levels - 1)."""
    unet = unet_config(preset)
    return vae_config(preset).downscale * 2 ** (len(unet.block_out_channels) - 1)


def ae_factor(config: Any) -> int:
    """Pixels per latent of the autoencoder stage's VAE (image sides must divide by it)."""
    from sdxl_jax.train import autoencoder

    return autoencoder.vae_preset(config.model.preset).downscale


def _groups(text: Any) -> tuple[str, ...]:
    return tuple(g.strip() for g in str(text or "").split(",") if g.strip())


def lora_config(config: Any, *, text: bool = False) -> LoRAConfig | None:
    """A stage's ``lora`` group as a :class:`LoRAConfig` for the UNet, or with ``text`` for
    the text encoders (``lora.text_groups``); None when the stage trains the whole UNet (no
    group, or rank 0) or, with ``text``, no text encoder adapters. ``alpha`` 0: alpha = rank."""
    c = config.get("lora")
    if c is None or not c.get("rank", 0):
        return None
    groups = _groups(c.get("text_groups", "") if text else c.get("groups", "attn"))
    if text and not groups:
        return None
    return LoRAConfig(
        rank=int(c.rank),
        alpha=float(c.alpha) if c.get("alpha", 0) else None,
        groups=groups,
        dropout=float(c.get("dropout", 0.0)),
    )


def lora_problems(config: Any) -> list[str]:
    """What is wrong with a stage's ``lora`` group (LoRA stages: ``experiments/lora.py``)."""
    c = config.get("lora")
    if c is None or not c.get("rank", 0):
        return []
    problems = []
    if c.rank < 0:
        problems.append(f"lora.rank {c.rank}: need >= 1 (0 trains the whole UNet)")
    if c.get("alpha", 0) < 0:
        problems.append(f"lora.alpha {c.alpha}: need > 0 (0 means alpha = rank)")
    if not 0 <= c.get("dropout", 0.0) < 1:
        problems.append(f"lora.dropout {c.dropout}: need 0 <= p < 1")
    groups = _groups(c.get("groups", "attn"))
    if not groups or any(g not in LORA_GROUPS for g in groups):
        problems.append(f"lora.groups {c.groups!r}: use a comma list of {list(LORA_GROUPS)}")
    text_groups = _groups(c.get("text_groups", ""))
    if any(g not in ("attn", "mlp") for g in text_groups):
        problems.append(f"lora.text_groups {c.text_groups!r}: use attn, mlp or both, or empty")
    if text_groups and config.data.cache:
        problems.append(
            f"lora.text_groups {c.text_groups!r} trains text-encoder adapters, which need the "
            f"text encoded in the step, but data.cache is {config.data.cache!r}: set "
            "--config.data.cache='' (or drop lora.text_groups)"
        )
    formats = [f.strip() for f in str(c.get("export", "kohya,peft")).split(",") if f.strip()]
    if any(f not in ("kohya", "peft") for f in formats):
        problems.append(f"lora.export {c.export!r}: use kohya, peft or both (comma list)")
    if c.get("export_dtype", "fp16") not in ("fp16", "bf16", "fp32"):
        problems.append(f"lora.export_dtype {c.export_dtype!r}: use fp16, bf16 or fp32")
    if not config.init_from:
        problems.append(
            "a LoRA stage needs init_from: the model the adapters train on (a diffusers "
            "folder, a single file, or a finished stage of this workdir)"
        )
    return problems


def caption_problems(data: Any) -> list[str]:
    """``data_pipeline.caption_problems`` of the config's data fields (absent: defaults)."""
    return data_pipeline.caption_problems(
        data.get("caption_dropout", 0.0), data.get("shuffle_tags", False),
        data.get("keep_tags", 0), data.get("cache", ""),
    )  # fmt: skip


def validate(config: Any, n_devices: int) -> None:
    """Raise ValueError listing every problem of ``config`` (an ml_collections ConfigDict)."""
    problems = []
    try:
        sizes = sharding.mesh_shape(dict(config.mesh), n_devices)
        batch_devices = sizes["data"] * sizes["fsdp"]
        if config.data.global_batch_size % batch_devices:
            problems.append(
                f"data.global_batch_size {config.data.global_batch_size} does not divide over "
                f"the batch axes data x fsdp = {batch_devices}: use a multiple of {batch_devices}"
            )
    except ValueError as e:
        problems.append(str(e))
    diffusion = config.get("kind", "diffusion") == "diffusion"
    try:
        factor = latent_factor(config.model.preset) if diffusion else ae_factor(config)
        bset = buckets.bucket_set(config.data.bucket_set)
        bad = [(h, w) for h, w in bset.sizes if h % factor or w % factor]
        if bad:
            problems.append(
                f"bucket set {bset.name} has sides not divisible by {factor} (the VAE's and "
                f"UNet's total downsampling for model {config.model.preset}): {bad[:4]}; use a "
                f"bucket set with a step that is a multiple of {factor}"
            )
    except ValueError as e:
        problems.append(str(e))
    s = config.step
    if not diffusion:
        pass
    elif not 0 <= s.t_min < s.t_max <= 1000:
        problems.append(f"step.t_min {s.t_min} / t_max {s.t_max}: need 0 <= t_min < t_max <= 1000")
    if diffusion and s.prediction_type not in PREDICTION_TYPES:
        problems.append(
            f"step.prediction_type {s.prediction_type!r}: use one of {PREDICTION_TYPES}"
        )
    if diffusion and not 0 <= s.cond_dropout < 1:
        problems.append(f"step.cond_dropout {s.cond_dropout}: need 0 <= p < 1")
    crops = config.data.get("cache_crops", 0)
    if not isinstance(crops, int) or crops < 0:
        problems.append(f"data.cache_crops {crops!r}: need 0 (centre crops) or a count >= 1")
    elif crops and config.data.get("cache", "") != "auto":
        problems.append(
            f"data.cache_crops {crops} caches random crops when data.cache is 'auto' (it is "
            f"{config.data.get('cache', '')!r}): set --config.data.cache=auto, or build the "
            "cache with python -m sdxl_jax.data.cache --random-crops K"
        )
    if not config.optim.lr > 0:  # also NaN
        problems.append(f"optim.lr {config.optim.lr}: need a learning rate > 0, e.g. 1e-4")
    if config.optim.warmup_steps > config.optim.total_steps:
        problems.append("optim.warmup_steps exceeds optim.total_steps")
    problems += lora_problems(config) + caption_problems(config.data)
    problems += dreambooth.problems(config)
    if problems:
        raise ValueError(
            f"config for stage {config.stage!r} cannot run:\n- " + "\n- ".join(problems)
        )
