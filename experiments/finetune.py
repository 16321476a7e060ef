"""Fine-tune a pretrained SDXL (diffusers folder or single file) on your dataset.

python -m sdxl_jax.train --config experiments/finetune.py --workdir gs://BUCKET/run
python -m sdxl_jax.train --config experiments/finetune.py:tiny --workdir /tmp/run   # CPU
"""

import ml_collections

from experiments import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common.base_config("finetune")
    c.init_from = ""  # set --config.init_from=PATH
    c.data.bucket_set = "sdxl_1024"
    c.data.global_batch_size = 64
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 500
    c.optim.total_steps = 10_000
    c.step.offset_noise = 0.05
    return common.tiny(c) if arg == "tiny" else c
