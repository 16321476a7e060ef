"""A refiner that starts from a base stage's weights (``init_from: <base stage>``).

The paper trains its refiner as a separate, differently shaped model. At toy size a refiner with
the base's architecture trains far faster when it starts from the base: the tiny refiner preset
differs from the tiny base only where the refiner's inputs do,

- cross-attention keys and values read the bigG context alone (the base reads CLIP-L then bigG,
  concatenated): the refiner keeps the base's bigG rows of ``attn2.to_k`` / ``attn2.to_v``;
- the added embedding reads pooled text + 5 time ids (original size, crop, aesthetic score)
  instead of 6 (original size, crop, target size): the pooled and size/crop rows are kept and
  the aesthetic score's rows start at zero, so the refiner first ignores the score.

Every other parameter is copied. Anything else that differs (the full-size SDXL refiner has other
widths and depths) is an error that says to start the refiner at random instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.models.unet import UNetConfig


def refiner_from_base(
    base: Any, base_cfg: UNetConfig, refiner_abstract: Any, refiner_cfg: UNetConfig
) -> Any:
    """The refiner's parameters (a tree like ``refiner_abstract``) made from a base UNet's."""
    text = ("cross_attention_dim", "projection_class_embeddings_input_dim", "remat")
    like = dataclasses.replace(base_cfg, **{k: getattr(refiner_cfg, k) for k in text})
    differ = [f.name for f in dataclasses.fields(like) if getattr(like, f.name) != getattr(
        refiner_cfg, f.name)]  # fmt: skip
    a = refiner_cfg.addition_time_embed_dim
    pooled = base_cfg.projection_class_embeddings_input_dim - 6 * a
    if refiner_cfg.projection_class_embeddings_input_dim != pooled + 5 * a:
        differ.append("projection_class_embeddings_input_dim (not pooled + 5 time ids)")
    if differ:
        raise _mismatch(", ".join(differ))
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}

    def adapt(path: tuple, want: Any) -> jax.Array:
        key = jax.tree_util.keystr(path)
        x = np.asarray(flat[key])
        if x.shape == want.shape:
            return jnp.asarray(x, want.dtype)
        # kernels are [..., in, out] (scanned stacks lead with the layer axis): cut rows of `in`
        if "attn2" in key and ("to_k" in key or "to_v" in key):
            # the base's context is [CLIP-L | bigG]: keep bigG's rows
            return jnp.asarray(x[..., -want.shape[-2] :, :], want.dtype)
        if "add_embedding" in key and "linear_1" in key:
            keep = pooled + 4 * a  # pooled, original size (2 ids), crop (2 ids)
            extra = np.zeros((*x.shape[:-2], want.shape[-2] - keep, x.shape[-1]), x.dtype)
            return jnp.asarray(np.concatenate([x[..., :keep, :], extra], -2), want.dtype)
        raise _mismatch(f"{key} {x.shape} vs {want.shape}")

    return jax.tree_util.tree_map_with_path(adapt, refiner_abstract)


def _mismatch(what: str) -> ValueError:
    return ValueError(
        f"init_from: a refiner starts from a base stage only when it has the base's "
        f"architecture apart from its text inputs (the tiny presets do); these differ: {what}. "
        f"Set init_from='' to start the refiner at random"
    )
