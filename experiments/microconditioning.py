"""The paper's Table 2 at toy size (section 2.2): three tiny bases on data that carries the signal.

VARIANTS, one stage each in one workdir (after the autoencoder stage on the same data):
- ``discard`` (a): originals smaller than the 64 px bucket left out (the paper's "512-only");
- ``nocond`` (b): all data, original size and crop coordinates zeroed (no micro-conditioning);
- ``cond`` (c): all data, conditioned on the original size and the crop (SDXL).

The data (``DATA``): the synthetic shapes with originals of short side 16..256 px (half of them
under 64 px, upscaled to the bucket and so blurry, as small photos are), aspects up to 2:1 and
the shape anywhere from 4% to 26% of the axis from its border; each record cached with
``CACHE_CROPS`` random crops and their real coordinates, one drawn per step. Same seed, data
order and step budget for all three.

    python -m sdxl_jax.train --config experiments/autoencoder.py:tiny \\
        --config.data.path='synthetic:2880?min_side=16&max_side=256&edge=0.04-0.26' \\
        --config.data.bucket_set=tiny_square_64 --config.ae.crop=32 \\
        --config.optim.total_steps=2000 --config.ae.disc_start=1800 --workdir W
    python -m sdxl_jax.train --config experiments/microconditioning.py:cond --workdir W

``python benchmarks/microconditioning.py`` runs the whole study (trainings, samples, scores).
"""

import ml_collections

from experiments import common

VARIANTS = ("discard", "nocond", "cond")
DATA = "synthetic:2880?min_side=16&max_side=256&edge=0.04-0.26"
BUCKET_SET = "tiny_square_64"  # one square bucket: 2:1 originals are cropped by up to 64 px
CACHE_CROPS = 4
STEPS = 1000
# The autoencoder stage (experiments/autoencoder.py:tiny, these overrides): trained on the 64 px
# bucket in random 32 px windows, 2000 steps, the discriminator for the last 200. The tiny
# default (whole 32 px images, 500 steps) lost most cut shapes in its round trip (26% of the
# training crops cut, 5% after encode + decode), so no base trained on it could show the crop
# effect; this one keeps them (30%). BENCHMARKS.md, "Size and crop conditioning".
AUTOENCODER = (f"data.bucket_set={BUCKET_SET}", "ae.crop=32", "optim.total_steps=2000",
               "ae.disc_start=1800")  # fmt: skip


def get_config(arg: str = "cond") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__, VARIANTS)
    c = common.tiny(common.base_config(f"microcond_{arg}"))
    c.data.path = DATA
    c.data.bucket_set = BUCKET_SET
    c.data.cache_crops = CACHE_CROPS
    c.data.drop_small = arg == "discard"
    c.step.micro_conditioning = arg != "nocond"
    c.optim.total_steps = STEPS
    c.checkpoint.every_steps = 250
    c.log.sample_every_steps = 0  # the study samples at the end
    return c
