"""Base stage 1 (paper 2.5): 256^2 squares, batch 2048, 600k steps, size and crop conditioning.

python -m sdxl_jax.train --config experiments/base_256.py --workdir gs://BUCKET/run
python -m sdxl_jax.train --config experiments/base_256.py:tiny --workdir /tmp/run   # CPU
"""

import ml_collections

from experiments import common

VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("base_256")
    return common.tiny(c) if arg == "tiny" else c
