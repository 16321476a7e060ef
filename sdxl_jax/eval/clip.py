"""CLIP image and text embeddings for the CLIP score, from a transformers ``CLIPModel`` folder.

The score is torchmetrics' ``CLIPScore``: max(mean over samples of 100 * cos(image embedding,
text embedding), 0), with inputs prepared as ``CLIPProcessor`` prepares them. Images go through
``clip_preprocess`` (transformers' ``CLIPImageProcessor``, to the bit); prompts through the
folder's CLIP tokenizer, padded, and cut at ``max_position_embeddings`` the way torchmetrics cuts
them: the ids are sliced, so a caption that long loses its end token and is pooled where the
reference pools it (the highest id, or position 0 where the end token is matched by id).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax.data.tokenizer import load_tokenizer
from sdxl_jax.eval.clip_preprocess import CLIPImageProcessing
from sdxl_jax.inference import runtime
from sdxl_jax.weights.clip_model import check_folder, find_clip_weights, load_clip_model

PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")  # fmt: skip


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


class CLIPEmbedder:
    """L2-normalised CLIP embeddings (float64 [N, projection_dim]) of images and prompts.

    Batches are padded to ``batch_size`` (rounded up to a multiple of the devices; one compile
    per tower) and split over the batch axes of
    ``mesh`` (default: every device); the weights are replicated.
    """

    def __init__(self, folder: str | Path, *, batch_size: int = 32, mesh: Mesh | None = None):
        self.folder = check_folder(folder)
        self.mesh = mesh if mesh is not None else runtime.make_mesh()
        if batch_size < 1:
            raise ValueError(f"CLIPEmbedder batch_size={batch_size} must be at least 1")
        # rounded up to a multiple of the devices the batch is split over
        self.batch_size = runtime.padded(batch_size, runtime.batch_devices(self.mesh))
        pre = self.folder / PREPROCESSOR_CONFIG
        if not pre.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no {PREPROCESSOR_CONFIG}; a CLIPModel folder needs the image "
                f"processor's settings (CLIPImageProcessor.save_pretrained writes them)"
            )
        self.processing = CLIPImageProcessing.from_config(json.loads(pre.read_text()))
        if not any((self.folder / n).is_file() for n in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(
                f"{self.folder} has no CLIP tokenizer (tokenizer.json, or vocab.json + "
                f"merges.txt); a CLIPModel folder carries the one its text tower was trained with"
            )
        self.tokenizer = load_tokenizer(self.folder)
        self._weight_paths = find_clip_weights(self.folder).paths
        replicated = NamedSharding(self.mesh, P())
        text, vision = load_clip_model(self.folder, sharding=lambda path, var: replicated)
        self.text_config, self.vision_config = text.config, vision.config
        size = self.vision_config.image_size
        if self.processing.crop_size != (size, size) or not self.processing.do_center_crop:
            raise ValueError(
                f"{pre}: images come out {self.processing.crop_size} (do_center_crop="
                f"{self.processing.do_center_crop}), the vision tower takes {size}x{size}"
            )
        self._text = nnx.split(text)
        self._vision = nnx.split(vision)
        self._embed_text = jax.jit(lambda s, ids: nnx.merge(self._text[0], s)(ids).text_embeds)
        self._embed_images = jax.jit(lambda s, px: nnx.merge(self._vision[0], s)(px).image_embeds)
        self._fingerprint: dict[str, Any] | None = None

    def _run(self, fn: Any, state: Any, rows: np.ndarray) -> np.ndarray:
        """``fn`` over ``rows`` in padded, sharded batches -> float32 [len(rows), P]."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            pad = self.batch_size - len(chunk)
            batch = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
            emb = fn(state, runtime.shard_batch(batch, self.mesh))
            out.append(np.asarray(emb)[: len(chunk)])
        return np.concatenate(out)

    def image_embeds(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [N, H, W, 3], or a list of uint8 [H, W, 3] of any sizes -> float64 [N, P]."""
        if isinstance(images, np.ndarray):
            if images.ndim != 4:  # one [H, W, 3] image would be read as H grey rows
                raise ValueError(
                    f"image_embeds takes uint8 [N, H, W, 3] or a list of [H, W, 3] images, got "
                    f"an array of shape {images.shape}"
                )
            images = list(images)
        if len(images) == 0:
            return np.zeros((0, self.vision_config.projection_dim))
        pixels = []  # preprocessed a batch at a time, so host memory holds one batch
        for start in range(0, len(images), self.batch_size):
            chunk = np.stack(
                [self.processing(im) for im in images[start : start + self.batch_size]]
            )
            pixels.append(self._run(self._embed_images, self._vision[1], chunk))
        return _normalised(np.concatenate(pixels))

    def token_ids(self, prompts: Sequence[str]) -> np.ndarray:
        """int32 [N, max_position_embeddings]: tokenised, sliced at that length as torchmetrics
        slices, padded with the tokenizer's pad id (the text tower is causal and pools at or
        before the end token, so padding after it changes nothing)."""
        if isinstance(prompts, str):
            raise TypeError("text_embeds takes a list of prompts, not one string")
        t = self.text_config.max_position_embeddings
        ids = self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
        out = np.full((len(ids), t), self.tokenizer.pad_token_id, np.int32)
        for row, seq in enumerate(ids):
            seq = seq[:t]
            out[row, : len(seq)] = seq
        return out

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> float64 [N, P], L2-normalised."""
        ids = self.token_ids(prompts)
        if len(ids) == 0:
            return np.zeros((0, self.text_config.projection_dim))
        return _normalised(self._run(self._embed_text, self._text[1], ids))

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the embeddings depend on (JSON-able): the weight files' hash, the configs' and
        tokenizer's hash, the image size. The weights are hashed once, on first use."""
        if self._fingerprint is None:
            configs = [self.folder / "config.json", self.folder / PREPROCESSOR_CONFIG]
            configs += [self.folder / n for n in TOKENIZER_FILES if (self.folder / n).is_file()]
            self._fingerprint = {
                "extractor": "clip",
                "weights_sha256": _sha256(self._weight_paths),
                "config_sha256": _sha256(configs),
                "image_size": self.vision_config.image_size,
                "projection_dim": self.vision_config.projection_dim,
                "max_length": self.text_config.max_position_embeddings,
            }
        return dict(self._fingerprint)
