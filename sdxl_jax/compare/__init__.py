"""A blind pairwise preference study between runs of ``python -m sdxl_jax.sample``, as the
SDXL paper ran one (its Fig. 1 and appendix E): ``make`` the sides, ``serve`` a voting page,
``report`` win rates with intervals. Entry point: ``python -m sdxl_jax.compare``."""
