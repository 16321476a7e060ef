"""Autoencoder stage (paper 2.4): the SD/SDXL VAE architecture trained with L1 + KL + LPIPS + an
adaptively weighted PatchGAN term, batch 256, EMA of the weights (sdxl_jax.train.autoencoder).

python -m sdxl_jax.train --config experiments/autoencoder.py --workdir gs://BUCKET/run \
    --config.ae.perceptual_path=/path/lpips_vgg16.safetensors
python -m sdxl_jax.train --config experiments/autoencoder.py:tiny --workdir /tmp/run   # CPU

Choices (the paper gives only the architecture, batch 256 and the EMA):
- loss weights, discriminator and its start are LDM's kl-f8 config (kl 1e-6, disc 0.5 from step
  50,001, hinge, 3-layer PatchGAN, LPIPS-VGG16 weight 1); Adam betas (0.5, 0.9), no weight decay,
  as LDM. LDM scales 4.5e-6 per sample (scale_lr): 1.15e-3 at 256; we use 1e-4 with 5k warm-up
  steps and clipping, a safer value for a long run (override optim.lr to follow LDM).
- 256x256 crops (square_256), as SD's autoencoders were trained; steps unpublished (placeholder).
- no LPIPS weights ship with this repo (no model hub): give ae.perceptual_path; without it the
  perceptual term is off and the run says so.
Diffusion-only keys (step.t_*, prediction_type, noise offsets, cond dropout, model.remat /
checkpoint / vae, data.cache, log.sample_*) are removed; step.ema_decay stays.
"""

import ml_collections

from experiments import common

DIFFUSION_STEP_KEYS = (
    "t_min",
    "t_max",
    "offset_noise",
    "prediction_type",
    "min_snr_gamma",
    "cond_dropout",
    "ema_warmup",  # the autoencoder's is ae.ema_warmup
    "micro_conditioning",
)
DIFFUSION_KEYS = (
    ("model", "remat"),
    ("model", "checkpoint"),
    ("model", "vae"),
    ("data", "cache"),
    ("data", "cache_crops"),
    ("log", "sample_prompts"),
    ("log", "sample_size"),
)


VARIANTS = common.VARIANTS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    common.check_variant(arg, __file__)
    c = common.base_config("autoencoder")
    c.kind = "autoencoder"
    c.model.preset = "sdxl"  # sdxl_jax.train.autoencoder.VAE_PRESETS: sdxl | tiny | tiny_fast
    c.model.compute_dtype = "bfloat16"
    c.data.bucket_set = "square_256"
    c.data.global_batch_size = 256
    c.optim.update(
        lr=1e-4, warmup_steps=5_000, total_steps=250_000, weight_decay=0.0, b1=0.5, b2=0.9
    )
    c.ae = ml_collections.ConfigDict(
        {
            "l1_weight": 1.0,
            "kl_weight": 1e-6,
            "perceptual_weight": 1.0,
            "perceptual_path": "",  # .safetensors: VGG16 features.* + LPIPS lin*; "": term off
            "disc_weight": 0.5,
            "disc_start": 50_001,  # steps with reconstruction losses only
            "disc_loss": "hinge",  # or "vanilla" (non-saturating)
            "disc_preset": "patchgan",  # or "tiny"
            "disc_lr": 1e-4,
            "sample_posterior": True,  # decode z ~ q(z|x) (LDM); False: the mean
            "crop": 0,  # random square crop inside the step (0: the batch's images as they are)
            "ema_warmup": True,  # LDM LitEma: decay min(ema_decay, (1 + n) / (10 + n))
            "logvar_init": 0.0,  # added to the posterior log-variance at random init (0: as is)
            "preview_images": 8,  # first dataset images shown with their EMA reconstructions
            "scale_images": 256,  # images whose latents set the exported scaling_factor
        }
    )
    if arg == "tiny":
        tiny(c)
    for key in DIFFUSION_STEP_KEYS:
        del c.step[key]
    for group, key in DIFFUSION_KEYS:
        if key in c[group]:
            del c[group][key]
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """CPU: a ~90 s stage on 2 cores whose VAE reconstructs the synthetic shapes (32 and 64 px).

    Whole 32 px images, batch 16, 500 steps (800 reconstruct colours better, 98% against 92%
    (benchmarks/autoencoder_tiny.py), but did not raise the curriculum's colour score); the
    posterior starts nearly sharp (logvar_init) and
    the discriminator joins for the last 100 steps (earlier, it slows a run this short down, as
    LDM's late disc_start avoids at scale); a short EMA (0.95) that follows the fast-moving
    weights. benchmarks/autoencoder_tiny.py measures time and reconstruction scores."""
    common.tiny(c)  # mesh, synthetic data in the workdir, workers, checkpoint and log cadence
    c.model.preset = "tiny_fast"
    c.data.bucket_set = "tiny_square_32"
    c.data.global_batch_size = 16
    c.optim.update(lr=1e-3, warmup_steps=20, total_steps=500, schedule="constant")
    c.step.ema_decay = 0.95
    c.ae.update(disc_preset="tiny", disc_start=400, disc_lr=1e-3, logvar_init=-6.0, scale_images=64)
