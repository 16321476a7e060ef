"""DreamBooth: teach a pretrained SDXL a subject from a few images, with prior preservation.

python -m sdxl_jax.train --config experiments/dreambooth.py --workdir /runs/dog \
    --config.init_from=/models/stable-diffusion-xl-base-1.0 \
    --config.dreambooth.instance_data=/data/dog \
    --config.dreambooth.instance_prompt="a photo of sks dog" \
    --config.dreambooth.class_prompt="a photo of a dog"
python -m sdxl_jax.train --config experiments/dreambooth.py:tiny --workdir /tmp/run   # CPU

As diffusers' ``train_dreambooth_lora_sdxl.py``: LoRA adapters (``experiments/lora.py``'s
stage with its ``lora`` fields; diffusers' defaults: rank 4, lr 1e-4, batch 4, 500 steps) on
the frozen model ``init_from`` names. Before training, the stage generates
``num_class_images`` images of ``class_prompt`` with that model (into ``<stage>/class_images``,
or ``class_data``; kept, and reused by a rerun) and prepares one dataset of the subject's
images (caption files, else ``instance_prompt``) and the class images, whose loss counts
``prior_loss_weight`` times (prior preservation: the model keeps what the class looks like).
``instance_data`` may also be any prepare source, e.g. ``folder:DIR?layout=kohya`` for
kohya's ``N_tokens`` folders. The export is the LoRA (kohya and diffusers/PEFT files).

``class_data`` may also be a prepare source spec (``folder:DIR``, ``tfds:NAME``, ...):
regularisation images of real data, used as they are (kohya's reg images), none generated.

The tiny variant teaches the tiny curriculum's base (``init_from=base_1024`` in the same
workdir) a new word: "blorp" for purple, from 12 renders; its regularisation images are 144
renders of the 72 synthetic captions (``synthetic:144?seed=11``).
"""

import ml_collections

from experiments import common
from experiments import lora as lora_exp

VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = lora_exp.get_config(arg)  # the LoRA stage's fields, optimizer and export
    c.stage = "dreambooth"
    c.dreambooth = ml_collections.ConfigDict(
        {
            "instance_data": "",  # a folder of the subject's images, or a prepare source spec
            "instance_prompt": "",  # the caption of images without one: "a photo of sks dog"
            # The subject's images are used this often per epoch; 0: as many times as makes
            # their uses match the class images' (diffusers pairs one of each per example).
            "instance_repeats": 0,
            # Prior preservation: the weight of the class images' loss (0: none, no class
            # images); the class prompt, or a prompt file / "synthetic" (prompts in turn).
            "prior_loss_weight": 1.0,
            "class_prompt": "",
            "num_class_images": 100,
            # Their folder ("": <stage>/class_images; missing ones made), or a prepare
            # source spec of regularisation images used as they are (none made).
            "class_data": "",
            "class_resolution": 0,  # 0: the model's size
            "class_steps": 30,
            "class_guidance": 5.0,
            "class_seed": 0,
        }
    )
    c.data.path = ""  # prepared by the stage from dreambooth.instance_data
    if arg == "tiny":
        c.dreambooth.instance_data = "synthetic:12?seed=5&colour=purple&word=blorp"
        c.dreambooth.instance_prompt = "a blorp shape"  # (the renders have captions)
        # Regularisation images: renders of the 72 original captions (kohya's reg images).
        # The base's own samples as class images (class_data "", class_prompt "synthetic")
        # kept nothing at this scale: old captions' all-three fell 20-23 points, as without
        # any; these keep it within 1-3 (BENCHMARKS.md, "LoRA / DreamBooth").
        c.dreambooth.class_data = "synthetic:144?seed=11"
        c.dreambooth.class_prompt = "synthetic"  # (for class images made with class_data "")
        c.dreambooth.num_class_images = 144
        c.dreambooth.class_resolution = 64
        c.dreambooth.class_guidance = 7.0
        c.data.global_batch_size = 16
        c.optim.lr = 2e-3
        c.optim.total_steps = 150
        c.checkpoint.every_steps = 150
        c.log.sample_every_steps = 0
        c.log.sample_prompts = ("a blorp circle in the top left", "a red square in the top right")
        return c
    # diffusers' train_dreambooth_lora_sdxl.py defaults: rank 4, lr 1e-4 constant, Adam
    # weight decay 1e-4, batch 4, 500 steps for its dog example.
    c.lora.rank = 4
    c.data.global_batch_size = 4
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.total_steps = 500
    c.optim.schedule = "constant"
    c.optim.weight_decay = 1e-4
    c.checkpoint.every_steps = 250
    c.log.sample_every_steps = 100
    return c
