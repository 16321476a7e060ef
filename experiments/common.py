"""What every training stage's config holds, with the paper's defaults; stages override.

A stage config is an ml_collections ConfigDict; ``python -m sdxl_jax.train`` locks it, so a
misspelt ``--config.key=value`` fails. Each stage file's ``get_config(arg)`` takes one of its
``VARIANTS`` (``check_variant``): "" (full size) or "tiny". ``tiny(config)`` turns any stage
into its CPU variant (tiny models, the synthetic dataset, small buckets and batches).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

VARIANTS = ("", "tiny")  # get_config(arg): "" the full-size stage, "tiny" its CPU variant


def check_variant(arg: str, file: str, variants: tuple[str, ...] = VARIANTS) -> None:
    """Refuse a variant the stage file does not have (``--config base_256.py:tny``)."""
    if arg not in variants:
        path = f"experiments/{Path(file).name}"
        known = ", ".join(f"{path}:{v}" if v else f"{path} (full size)" for v in variants)
        raise ValueError(f"{path} has no variant {arg!r}; use one of: {known}")


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # the stage's folder under the workdir
    c.kind = "diffusion"  # what trains: "diffusion" (a UNet) or "autoencoder"
    # Previous stage's folder (its final EMA weights) or a pretrained checkpoint (diffusers
    # folder or single file); empty: random init.
    c.init_from = ""
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # checkpoint: an SDXL diffusers folder or single file holding the frozen VAE and text
    # encoders (and tokenizers); vae: a different VAE (a folder with vae/, or the name of a
    # finished autoencoder stage in this workdir).
    c.model = ml_collections.ConfigDict(
        {
            "preset": "sdxl_base",
            "remat": True,
            "compute_dtype": "bfloat16",
            "checkpoint": "",
            "vae": "",
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            "path": "",
            "bucket_set": "sdxl_256",
            "global_batch_size": 2048,
            "remainder": "drop",
            "random_crop": True,
            "flip": False,
            "num_workers": 8,
            "prefetch": 2,
            "cache": "",  # a folder from python -m sdxl_jax.data.cache, or "auto"
            # With cache "auto": 0 caches each record's centre crop; K > 0 caches K random
            # crops per record with their coordinates, one drawn per step (crop conditioning).
            "cache_crops": 0,
            # kohya's caption options (online text only: cache ''): the chance a caption
            # becomes "", and shuffling its comma-separated tags but the first keep_tags.
            "caption_dropout": 0.0,
            "shuffle_tags": False,
            "keep_tags": 0,
        }
    )
    c.optim = ml_collections.ConfigDict(
        {
            "lr": 1e-4,
            "warmup_steps": 10_000,
            "schedule": "constant",
            "total_steps": 600_000,
            "clip_norm": 1.0,
            "accumulate": 1,
            "weight_decay": 1e-2,
            "b1": 0.9,
            "b2": 0.999,
        }
    )
    c.step = ml_collections.ConfigDict(
        {
            "t_min": 0,
            "t_max": 1000,
            "offset_noise": 0.0,
            "prediction_type": "epsilon",
            "min_snr_gamma": 0.0,  # 0: off
            "cond_dropout": 0.1,
            "ema_decay": 0.9999,
            "ema_warmup": True,  # decay min(ema_decay, (1 + n) / (10 + n)) at step n
            # False: original size and crop coordinates enter the UNet as zeros (the paper's
            # Table 2 baseline without size/crop conditioning); sample such a model with
            # original size (0, 0) and crop (0, 0).
            "micro_conditioning": True,
        }
    )
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 5000, "keep": 3})
    # Sample grids in TensorBoard: DDIM 20 steps, guidance 4, the EMA weights; size 0: the
    # model's default (UNet sample_size x VAE factor).
    c.log = ml_collections.ConfigDict(
        {
            "every_steps": 50,
            "sample_every_steps": 5000,
            "sample_prompts": (
                "a photograph of an astronaut riding a horse",
                "a red fox in the snow, golden hour",
                "a watercolour painting of a lighthouse on a cliff",
                "a bowl of ramen, studio lighting",
            ),
            "sample_size": 0,
            # Each process appends (step, bucket, its record indices) to
            # <stage>/data_trace/process_<i>.jsonl: which host read what, step by step.
            "trace_data": False,
        }
    )
    # Evaluation during training (sdxl_jax/train/evaluation.py): every `every_steps` steps (0:
    # off) and at the end, the EMA weights sample `prompts` (a prompt file, a prepared dataset,
    # "synthetic"; `count` of them by `seed`, 0: all) with DDIM and the metrics are logged as
    # eval/<metric>. fid/kid/is need `inception` (pytorch-fid's weights as safetensors) and,
    # for fid/kid, `ref` (images, a dataset or stats .npz; default: a dataset prompt set's own
    # images); clip needs `clip` (a transformers CLIPModel folder).
    c.eval = ml_collections.ConfigDict(
        {
            "every_steps": 0,
            "metrics": "fid,clip",
            "prompts": "",
            "count": 0,
            "seed": 0,
            "inception": "",
            "clip": "",
            "ref": "",
            "dims": 2048,
            "mode": "pytorch-fid",
            "steps": 20,
            "guidance": 4.0,
            "size": 0,
            "batch_size": 16,
        }
    )
    c.max_bad_steps = 10  # non-finite updates in a row before the run stops
    return c


TINY_BUCKETS = {"sdxl_1024": "tiny_aspect_64", "sdxl_512": "tiny_square_64"}
TINY_DATA = "synthetic:2880"  # 40 of each of the 72 captions, prepared once into the workdir


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU variant of a stage: tiny models, synthetic data, 32-64 pixel buckets.

    The frozen text encoders are tiny random CLIPs with a tokenizer for the synthetic captions
    (``<workdir>/frozen``, made on first use); the VAE is the tiny autoencoder stage's export.
    """
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.model.preset = "tiny_refiner" if c.model.preset == "sdxl_refiner" else "tiny"
    c.model.remat = False
    c.model.compute_dtype = "float32"
    c.model.checkpoint = "frozen"
    c.model.vae = "autoencoder"
    c.data.path = TINY_DATA
    c.data.bucket_set = TINY_BUCKETS.get(c.data.bucket_set, "tiny_square_32")
    c.data.global_batch_size = 32
    c.data.num_workers = 0
    # Latents and text embeddings computed once (centre crops): on 2 CPU cores the frozen VAE
    # would otherwise cost more than the UNet's step.
    c.data.cache = "auto"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.total_steps = 600
    c.optim.schedule = "cosine"  # short runs end better annealed
    c.step.ema_decay = 0.999
    # min-SNR-gamma loss weighting (Hang et al. 2023) learns faster: at the tiny curriculum's
    # budget it took shape accuracy from 44% to 62% (BENCHMARKS.md). Full-size stages keep the
    # paper's plain epsilon loss.
    c.step.min_snr_gamma = 5.0
    c.checkpoint.every_steps = 200
    c.log.every_steps = 20
    c.log.sample_every_steps = 200
    # At toy size the exact synthetic scorer is the metric: every caption, 72 images
    # (enable with --config.eval.every_steps=N).
    c.eval.metrics = "synthetic"
    c.eval.prompts = "synthetic"
    c.eval.batch_size = 24
    c.log.sample_prompts = (
        "a red circle in the top left",
        "a blue square in the bottom right",
        "a green triangle in the top right",
        "a yellow circle in the bottom left",
    )
    return c
