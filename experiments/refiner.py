"""The refiner: its own UNet on the first 200 noise levels, at ~1024^2 buckets.

python -m sdxl_jax.train --config experiments/refiner.py --workdir gs://BUCKET/run
python -m sdxl_jax.train --config experiments/refiner.py:tiny --workdir /tmp/run   # CPU

At toy size the refiner has the base's architecture apart from its text inputs, so the tiny
curriculum starts it from the base (``--config.init_from=base_1024``: sdxl_jax/train/warm_start.py);
the full-size refiner is its own model and starts at random, as in the paper.
"""

import ml_collections

from experiments import common

VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("refiner")
    c.model.preset = "sdxl_refiner"
    c.data.bucket_set = "sdxl_1024"
    c.step.t_max = 200
    c.optim.total_steps = 200_000
    return common.tiny(c) if arg == "tiny" else c
