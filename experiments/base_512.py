"""Base stage 2: 512^2, 200k more steps, from stage 1's final EMA.

python -m sdxl_jax.train --config experiments/base_512.py --workdir gs://BUCKET/run
python -m sdxl_jax.train --config experiments/base_512.py:tiny --workdir /tmp/run   # CPU
"""

import ml_collections

from experiments import common

VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("base_512")
    c.init_from = "base_256"
    c.data.bucket_set = "sdxl_512"
    c.optim.total_steps = 200_000
    return common.tiny(c) if arg == "tiny" else c
