"""Cache mode: run the frozen VAE encoder and text encoders once, store latents and embeddings.

Training then reads fixed-size arrays instead of decoding, resizing and encoding images at every
step (the frozen encoders are a large share of a fine-tuning step). The price: fixed crops (one
centre crop per record, or K random crops per record with ``--random-crops K``, training drawing
one of them per step; no flips), and disk space (the bigG + CLIP-L context is 77 x 2048 numbers
per caption). Layout, under ``OUT``:

- ``bucket_<b>/{latent_mean,latent_logvar,context,pooled}.npy``: one row per record of bucket b
  ([n, h/8, w/8, 4] float16, ..., [n, 77, D] float16, [n, P] float16), memory-mapped on read
  (n = records x K with random crops: a record's K crops are consecutive rows);
- ``bucket_<b>/DONE``: written last, so an interrupted build redoes only unfinished buckets;
- ``cache_index.npz``: for every record of the dataset, its bucket and (first) row (-1: not
  cached), and its ``original_size`` / ``crop_coords_top_left`` ([N, 2], or [N, K, 2] with
  random crops) / ``target_size``;
- ``cache_meta.json``: the checkpoint, bucket set, crop mode and the VAE's scaling.

The context is the base's (CLIP-L then bigG, 768 + 1280); a refiner uses ``context[..., 768:]``,
the bigG part, and the same pooled embedding.

``python -m sdxl_jax.data.cache --data DIR --checkpoint PATH --bucket-set NAME --out OUT``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "cache_index.npz"
META = "cache_meta.json"
ARRAYS = ("latent_mean", "latent_logvar", "context", "pooled")


class CachedSource:
    """Random access to a cache: record i (its crop k) -> latents, embeddings and
    micro-conditioning; ``crops_per_record`` crops of each record are stored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = np.load(self.path / INDEX)
        self.bucket, self.row = index["bucket"], index["row"]
        self.original_size = index["original_size"]
        crops = index["crop_coords_top_left"]
        self.crop_coords_top_left = crops if crops.ndim == 3 else crops[:, None]  # [N, K, 2]
        self.crops_per_record = int(self.crop_coords_top_left.shape[1])
        self.target_size = index["target_size"]
        self.meta = json.loads((self.path / META).read_text())
        self._open()

    def _open(self) -> None:
        """Map every bucket's arrays now, in the thread that builds (or unpickles) the source:
        np.load parses headers with ast, and CPython 3.11 races when threads parse at once
        ("SystemError: AST constructor recursion depth mismatch"), so loader threads must not."""
        used = np.unique(self.bucket[self.row >= 0])
        self._arrays: dict[int, dict[str, np.ndarray]] = {
            int(b): {
                n: np.load(self.path / f"bucket_{b}" / f"{n}.npy", mmap_mode="r") for n in ARRAYS
            }
            for b in used
        }

    def __len__(self) -> int:
        return len(self.bucket)

    def _bucket_arrays(self, b: int) -> dict[str, np.ndarray]:
        return self._arrays[b]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.get(i, 0)

    def get(self, i: int, k: int) -> dict[str, np.ndarray]:
        """Record ``i``'s crop ``k`` (0 <= k < crops_per_record)."""
        b, r = int(self.bucket[i]), int(self.row[i])
        if r < 0:
            raise IndexError(f"record {i} is not in the cache (outside the bucket set)")
        if not 0 <= k < self.crops_per_record:
            raise IndexError(f"crop {k} of record {i}: the cache holds {self.crops_per_record}")
        arrays = self._bucket_arrays(b)
        out = {n: np.asarray(a[r + k]) for n, a in arrays.items()}
        out.update(
            original_size=self.original_size[i],
            crop_coords_top_left=self.crop_coords_top_left[i, k],
            target_size=self.target_size[i],
            bucket=np.int32(b),
        )
        return out

    def __getstate__(self) -> dict[str, Any]:  # picklable for grain workers: reopen memmaps
        state = dict(self.__dict__)
        del state["_arrays"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()


if __name__ == "__main__":  # the builder runs the frozen encoders: it lives above the models
    from sdxl_jax.train.cache_builder import main

    sys.exit(main())
