"""sdxl_jax: SDXL-class latent diffusion training in JAX/Flax."""

__version__ = "0.1.0"
