"""Single-file SDXL checkpoints (sgm / A1111 / ComfyUI layout).

Each component's key mapping lives in its own module (``sgm_unet``, ``sgm_vae``, ``sgm_clip``) as a
function ``sgm_name(ref_key, config) -> SgmTensor`` from the reference (diffusers/transformers)
key to where the tensor lives in the single file, relative to the component's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SgmTensor:
    """Where a reference tensor lives in a single-file checkpoint."""

    key: str  # key in the file, without the component's prefix
    # part >= 0: the reference tensor is chunk ``part`` of ``parts`` equal chunks along dim 0 of
    # ``key`` (OpenCLIP stores q, k, v stacked in ``attn.in_proj_weight``).
    part: int = -1
    parts: int = 1
    squeeze: bool = False  # file holds [C, C, 1, 1] (a 1x1 conv) where the reference has [C, C]
    transpose: bool = False  # file holds the transpose (OpenCLIP ``text_projection``)
