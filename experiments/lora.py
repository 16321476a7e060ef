"""LoRA fine-tuning: low-rank adapters on a frozen pretrained SDXL UNet.

python -m sdxl_jax.train --config experiments/lora.py --workdir gs://BUCKET/lora \
    --config.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/mine
python -m sdxl_jax.train --config experiments/lora.py:tiny --workdir /tmp/run   # CPU

Only the adapters train (and are in the optimizer state, the checkpoints and the EMA); the base
stays frozen in the compute dtype, sharded by the usual rules. The export
(``<stage>/export``) holds the adapters as ``lora.safetensors`` (kohya's format: ComfyUI, A1111,
diffusers) and ``pytorch_lora_weights.safetensors`` (diffusers / PEFT); sample with
``python -m sdxl_jax.sample --checkpoint BASE --lora <stage>/export/lora.safetensors``.
The tiny variant trains on the tiny curriculum's multi-aspect stage (``init_from=base_1024``
in the same workdir).
"""

import ml_collections

from experiments import common


def lora_group(rank: int = 32) -> ml_collections.ConfigDict:
    """The ``lora`` fields (shared with ``experiments/dreambooth.py``)."""
    return ml_collections.ConfigDict(
        {
            "rank": rank,
            "alpha": 0.0,  # 0: alpha = rank (scale 1, as diffusers' scripts); kohya uses 1
            # Layers with adapters, a comma list of: attn (the attention projections to_q/k/v/
            # out), ff (feed-forward), proj (proj_in / proj_out), conv (ResNet and resampler
            # convolutions, LoCon).
            "groups": "attn",
            # Text-encoder adapters (both encoders; the refiner's one), a comma list of attn
            # (q/k/v/out projections) and mlp (fc1, fc2); empty: the encoders stay frozen.
            # They need the text encoded in the step: data.cache=''.
            "text_groups": "",
            "dropout": 0.0,  # of the adapters' inputs (PEFT's lora_dropout)
            "export": "kohya,peft",  # the files written at the end of the stage
            "export_dtype": "fp16",
        }
    )


VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("lora")
    c.init_from = ""  # set --config.init_from=PATH (the model the adapters train on)
    c.lora = lora_group()
    c.data.bucket_set = "sdxl_1024"
    c.data.global_batch_size = 16
    # LoRA datasets are small (tens of images per concept): a bucket with fewer images than a
    # batch fills its batch by repeating them instead of being dropped.
    c.data.remainder = "repeat"
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 100
    c.optim.total_steps = 2_000
    c.optim.weight_decay = 1e-2
    c.step.ema_decay = 0.0  # kohya and diffusers' scripts keep no EMA of a LoRA: 0 = off
    c.step.ema_warmup = False
    c.checkpoint.every_steps = 500
    c.log.sample_every_steps = 250
    if arg == "tiny":
        common.tiny(c)
        c.init_from = "base_1024"
        c.lora.rank = 8
        c.lora.groups = "attn,ff"
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 10
        c.optim.total_steps = 200
        c.step.ema_decay = 0.0
        c.checkpoint.every_steps = 100
        c.log.sample_every_steps = 100
    return c
