"""Text and micro-conditioning for SDXL, shared by sampling and training.

- Both CLIP tokenizers come from a checkpoint's ``tokenizer/`` and ``tokenizer_2/`` folders
  (the second pads with "!" rather than the end token), truncating at 77 tokens.
- Context: penultimate hidden states of CLIP-L (768) and OpenCLIP bigG (1280) concatenated,
  2048 wide; the refiner uses bigG's alone. Pooled: bigG's projected end-token state.
- Micro-conditioning (paper 2.2): [original h, w, crop top, left, target h, w] for the base,
  [original h, w, crop top, left, aesthetic score] for the refiner.
- Dropping the text (empty negative prompt on the base, guidance dropout in training) zeroes
  context and pooled, keeping the size and crop conditioning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_jax.data.tokenizer import load_tokenizer  # noqa: F401 (conditioning.load_tokenizer)
from sdxl_jax.models.clip import CLIPTextModel

MAX_TOKENS = 77
# diffusers' SDXL refiner defaults: aesthetic score of the conditional and negative branch.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
TOKENIZER_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> tuple[np.ndarray, int]:
    """Token ids [B, 77] int32 padded with the tokenizer's pad token, and how many prompts
    were longer than 77 tokens (truncated, as SDXL was trained)."""
    max_len = min(int(tokenizer.model_max_length), MAX_TOKENS)
    full = tokenizer(list(prompts), truncation=False)["input_ids"]
    truncated = sum(len(ids) > max_len for ids in full)
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_len,
        truncation=True,
        return_tensors="np",
    )["input_ids"]
    return ids.astype(np.int32), truncated


@dataclasses.dataclass
class TextEncoders:
    """The frozen text encoders of one stage: (CLIP-L, bigG) for the base, (None, bigG) for
    the refiner; with their tokenizers."""

    clip_l: CLIPTextModel | None
    clip_g: CLIPTextModel
    tokenizer_l: Any | None
    tokenizer_g: Any

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Both tokenizations as a dict of [B, 77] int32 (keys ``ids_l`` and ``ids_g``)."""
        out = {}
        n_trunc = 0
        if self.clip_l is not None:
            out["ids_l"], n_trunc = tokenize(self.tokenizer_l, prompts)
        out["ids_g"], n2 = tokenize(self.tokenizer_g, prompts)
        n_trunc = max(n_trunc, n2)
        if n_trunc:
            warnings.warn(
                f"{n_trunc} prompt(s) are longer than {MAX_TOKENS} tokens and were truncated",
                stacklevel=2,
            )
        return out


def encode_text(
    clip_l: CLIPTextModel | None, clip_g: CLIPTextModel, ids: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(context [B, 77, D_l + D_g], pooled [B, P]) from token ids; traceable."""
    g = clip_g(ids["ids_g"])
    if g.text_embeds is None:
        raise ValueError("the second text encoder needs a text projection (pooled embedding)")
    context = g.penultimate
    if clip_l is not None:
        context = jnp.concatenate([clip_l(ids["ids_l"]).penultimate, context], axis=-1)
    return context.astype(jnp.float32), g.text_embeds.astype(jnp.float32)


def drop_text(
    context: jax.Array, pooled: jax.Array, drop: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Zero the text conditioning where ``drop`` [B] is true (guidance dropout, empty prompt)."""
    keep = (~drop).astype(context.dtype)
    return context * keep[:, None, None], pooled * keep[:, None]


def _namespace(*values: Any) -> Any:
    """jax.numpy when any value is a jax array (traced in a train step), else numpy."""
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def base_time_ids(
    original_size: Sequence[int] | np.ndarray | jax.Array,
    crop_top_left: Sequence[int] | np.ndarray | jax.Array,
    target_size: Sequence[int] | np.ndarray | jax.Array,
) -> np.ndarray | jax.Array:
    """[..., 6] float32: original (h, w), crop (top, left), target (h, w). numpy in, numpy out;
    jax arrays in (the train step), jax out."""
    xp = _namespace(original_size, crop_top_left, target_size)
    parts = xp.broadcast_arrays(
        xp.asarray(original_size, xp.float32),
        xp.asarray(crop_top_left, xp.float32),
        xp.asarray(target_size, xp.float32),
    )
    return xp.concatenate(parts, axis=-1)


def refiner_time_ids(
    original_size: Sequence[int] | np.ndarray | jax.Array,
    crop_top_left: Sequence[int] | np.ndarray | jax.Array,
    aesthetic_score: float | np.ndarray | jax.Array = AESTHETIC_SCORE,
) -> np.ndarray | jax.Array:
    """[..., 5] float32: original (h, w), crop (top, left), aesthetic score (one per row).
    numpy in, numpy out; jax arrays in (the train step), jax out."""
    xp = _namespace(original_size, crop_top_left, aesthetic_score)
    size = xp.asarray(original_size, xp.float32)
    crop = xp.broadcast_to(xp.asarray(crop_top_left, xp.float32), size.shape)
    score = xp.broadcast_to(xp.asarray(aesthetic_score, xp.float32), size.shape[:-1])[..., None]
    return xp.concatenate([size, crop, score], axis=-1)
