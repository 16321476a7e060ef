"""Fine-tune a pretrained SDXL (diffusers folder or single file) on your dataset.

python -m sdxl_jax.train --config experiments/finetune.py --workdir gs://BUCKET/run \
    --config.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/mine
python -m sdxl_jax.train --config experiments/finetune.py:tiny --workdir /tmp/run   # CPU

The UNet starts from ``init_from``'s weights (its config.json decides the architecture); the
frozen VAE and text encoders come from the same checkpoint unless model.checkpoint / model.vae
say otherwise. The tiny variant fine-tunes the tiny curriculum's multi-aspect stage
(``init_from=base_1024`` in the same workdir).
"""

import ml_collections

from experiments import common

VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("finetune")
    c.init_from = ""  # set --config.init_from=PATH
    c.data.bucket_set = "sdxl_1024"
    c.data.global_batch_size = 64
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 500
    c.optim.total_steps = 10_000
    c.step.offset_noise = 0.05
    if arg == "tiny":
        common.tiny(c)
        c.init_from = "base_1024"
        c.optim.lr = 2e-4
        c.optim.total_steps = 100
    return c
