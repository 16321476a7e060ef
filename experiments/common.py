"""What every training stage's config holds, with the paper's defaults; stages override.

A stage config is an ml_collections ConfigDict; ``python -m sdxl_jax.train`` locks it, so a
misspelt ``--config.key=value`` fails. ``tiny(config)`` turns any stage into its CPU variant
(tiny models, the synthetic dataset, small buckets and batches).
"""

from __future__ import annotations

import ml_collections


def base_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # the stage's folder under the workdir
    # Previous stage's folder (its final EMA weights) or a pretrained checkpoint (diffusers
    # folder or single file); empty: random init.
    c.init_from = ""
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.model = ml_collections.ConfigDict(
        {"preset": "sdxl_base", "remat": True, "compute_dtype": "bfloat16", "checkpoint": ""}
    )  # checkpoint: where the frozen VAE and text encoders come from (online mode)
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
            "cache": "",
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
        }
    )
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 5000, "keep": 3})
    c.log = ml_collections.ConfigDict({"every_steps": 50, "sample_every_steps": 5000})
    c.max_bad_steps = 10  # non-finite updates in a row before the run stops
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU variant of a stage: tiny models, synthetic data, 64-pixel buckets."""
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.model.preset = "tiny_refiner" if c.model.preset == "sdxl_refiner" else "tiny"
    c.model.remat = False
    c.model.compute_dtype = "float32"
    c.data.path = ""  # the trainer prepares synthetic:N into the workdir when empty
    c.data.bucket_set = "tiny_64" if c.data.bucket_set == "sdxl_1024" else "tiny_square_64"
    c.data.global_batch_size = 32
    c.data.num_workers = 0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.total_steps = 600
    c.step.ema_decay = 0.999
    c.checkpoint.every_steps = 200
    c.log.every_steps = 20
    c.log.sample_every_steps = 200
    return c
