"""Where a reference (diffusers / transformers) tensor lives in a single-file checkpoint."""

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
