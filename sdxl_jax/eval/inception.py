"""Inception features of uint8 images for FID / IS: the FID InceptionV3, batched and compiled once
per batch shape, over this host's devices.

Two preprocessing modes, each a published convention:
- ``"pytorch-fid"``: images /255, resized bilinearly to 299x299 inside the network (pytorch-fid's
  ``F.interpolate(..., mode="bilinear", align_corners=False)``, no antialiasing).
- ``"clean"``: clean-fid's resize (Parmar et al. 2022, "On Aliased Resizing and Surprising
  Subtleties in GAN Evaluation"): each channel as a float PIL image, bicubic to 299x299 with PIL's
  antialiasing, clipped to [0, 255], then /255 into the network without a further resize.

FID statistics from one mode are not comparable with the other's: ``fingerprint`` says which
extractor, weights and mode produced them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

from sdxl_jax import sharding
from sdxl_jax.inference import runtime
from sdxl_jax.models.inception import FEATURE_DIMS, RESOLUTION, fid_resize
from sdxl_jax.weights.inception import InceptionWeights, load_inception

MODES = ("pytorch-fid", "clean")


def clean_resize(image: np.ndarray, size: int = RESOLUTION) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 255], as clean-fid's
    ``make_resizer("PIL", False, "bicubic", (size, size))``: per channel, PIL mode "F" (float, so
    nothing is quantised after the resize), bicubic, clipped."""
    channels = [
        np.asarray(
            Image.fromarray(image[:, :, c].astype(np.float32)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


# Images per step of the loop inside each device's share of a batch on the CPU: the network's
# activations for one or two images stay in cache; a batch of 50 at once runs ~35% slower there
# (BENCHMARKS.md). Accelerators take their whole share at once.
CPU_MICRO_BATCH = 2


def _network(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, micro: int) -> Any:
    """One device's share [b, 299, 299, 3], ``micro`` images at a time."""
    model = nnx.merge(graphdef, state)
    if micro >= x.shape[0]:
        return model(x, resize=False)
    one = lambda im: jax.tree.map(lambda a: a[0], model(im[None], resize=False))
    return jax.lax.map(one, x, batch_size=micro)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _inception(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, mesh: Mesh, micro: int
) -> dict[str, jax.Array]:
    """The network on [B, 299, 299, 3] in [0, 1], B split over the mesh's batch axes: one
    compile per batch shape (the resize is outside, so images of any size share it)."""
    batch = P(sharding.BATCH_AXES)
    run = functools.partial(_network, graphdef, micro=micro)
    return jax.shard_map(run, mesh=mesh, in_specs=(P(), batch), out_specs=batch)(state, x)


@jax.jit
def _pytorch_fid_input(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> [B, 299, 299, 3] in [0, 1]: ToTensor's /255, then the resize."""
    return fid_resize(images.astype(jnp.float32) / 255)


def _as_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each image checked: uint8 [H, W, 3]."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images: expected uint8 [B, H, W, 3], got shape {images.shape}")
        images = list(images)
    out = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(
                f"image {i}: expected uint8 [H, W, 3] (RGB), got {im.dtype} {im.shape}; convert "
                f"float images with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)"
            )
        out.append(im)
    return out


class InceptionExtractor:
    """FID Inception features of uint8 images (see the module docstring for ``mode``).

    ``batch_size`` images go through the network at a time (rounded up to a multiple of the
    devices they are split over); the last batch is padded to it, so each mode and image size
    compiles once. ``mesh``: the devices to split batches over (default: this host's devices,
    as ``sdxl_jax.inference.runtime.make_mesh``); the weights are replicated on it.
    """

    def __init__(
        self,
        weights_path: str | Path,
        *,
        mode: str = "pytorch-fid",
        batch_size: int = 50,
        mesh: Mesh | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model, info = load_inception(weights_path)
        self.info: InceptionWeights = info
        self.mode: str = mode
        self.mesh = mesh if mesh is not None else runtime.make_mesh(jax.local_devices())
        self.batch_size = runtime.padded(batch_size, runtime.batch_devices(self.mesh))
        self._classes = model.fc.out_features
        self._graphdef, state = nnx.split(model)
        self._state = runtime.replicate(state, self.mesh)
        platform = self.mesh.devices.flat[0].platform
        self._micro = CPU_MICRO_BATCH if platform == "cpu" else self.batch_size

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What produced the features (JSON-able): statistics cached under another fingerprint
        are not comparable."""
        return {
            "extractor": "fid-inception-v3",
            "weights_sha256": self.info.sha256,
            "layout": self.info.layout,
            "mode": self.mode,
            "resolution": RESOLUTION,
        }

    def features(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 [B, H, W, 3], or a list of uint8 [H, W, 3] of any sizes -> {"64", "192", "768",
        "2048", "logits_unbiased", "logits"}: float64 [B, D] each, in the images' order."""
        images = _as_list(images)
        if self.mode == "clean":
            groups = {(RESOLUTION, RESOLUTION): list(range(len(images)))}
        else:
            groups = {}
            for i, im in enumerate(images):  # one array per size: pytorch-fid batches one size
                groups.setdefault(im.shape[:2], []).append(i)
        dims = {**FEATURE_DIMS, "logits_unbiased": self._classes, "logits": self._classes}
        out = {k: np.zeros((len(images), d), np.float64) for k, d in dims.items()}

        def collect(idx: list[int], result: dict[str, jax.Array]) -> None:
            for k, v in result.items():
                out[k][idx] = np.asarray(v)[: len(idx)]

        # One batch in flight while the next is prepared and dispatched; no more, or inputs
        # queued behind a slow device would pile up in its memory.
        pending = None
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                result = self._run([images[i] for i in idx])
                if pending is not None:
                    collect(*pending)
                pending = (idx, result)
        if pending is not None:
            collect(*pending)
        return out

    def _run(self, batch: list[np.ndarray]) -> dict[str, jax.Array]:
        """One batch (all one size), padded to ``batch_size``; returns without waiting."""
        if self.mode == "clean":
            x = np.stack([clean_resize(im) for im in batch]) / np.float32(255)
        else:
            x = np.stack(batch)  # uint8: a quarter of the bytes to the devices
        pad = self.batch_size - len(batch)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        x = runtime.shard_batch(x, self.mesh)
        if self.mode == "pytorch-fid":
            x = _pytorch_fid_input(x)
        return _inception(self._graphdef, self._state, x, self.mesh, self._micro)
