"""Base stage 3: multi-aspect ~1024^2 buckets (a bucket per batch), offset noise 0.05.

python -m sdxl_jax.train --config experiments/base_1024.py --workdir gs://BUCKET/run
python -m sdxl_jax.train --config experiments/base_1024.py:tiny --workdir /tmp/run   # CPU
"""

import ml_collections

from experiments import common

VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("base_1024")
    c.init_from = "base_512"
    c.data.bucket_set = "sdxl_1024"
    c.step.offset_noise = 0.05
    c.optim.total_steps = 50_000
    return common.tiny(c) if arg == "tiny" else c
