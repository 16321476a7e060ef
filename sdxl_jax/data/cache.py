"""Cache mode: run the frozen VAE encoder and text encoders once, store latents and embeddings.

Training then reads fixed-size arrays instead of decoding, resizing and encoding images at every
step (the frozen encoders are a large share of a fine-tuning step). The price: one fixed crop per
record (centre by default; no flips), and disk space (the bigG + CLIP-L context is 77 x 2048
numbers per caption). Layout, under ``OUT``:

- ``bucket_<b>/{latent_mean,latent_logvar,context,pooled}.npy``: one row per record of bucket b
  ([n, h/8, w/8, 4] float16, ..., [n, 77, D] float16, [n, P] float16), memory-mapped on read;
- ``bucket_<b>/DONE``: written last, so an interrupted build redoes only unfinished buckets;
- ``cache_index.npz``: for every record of the dataset, its bucket and row (-1: not cached), and
  its ``original_size`` / ``crop_coords_top_left`` / ``target_size``;
- ``cache_meta.json``: the checkpoint, bucket set, crop mode and the VAE's scaling.

The context is the base's (CLIP-L then bigG, 768 + 1280); a refiner uses ``context[..., 768:]``,
the bigG part, and the same pooled embedding.

``python -m sdxl_jax.data.cache --data DIR --checkpoint PATH --bucket-set NAME --out OUT``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.workdir import is_remote

INDEX = "cache_index.npz"
META = "cache_meta.json"
ARRAYS = ("latent_mean", "latent_logvar", "context", "pooled")


def build_cache(
    data: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    bucket_set: str,
    vae: str | Path | None = None,
    batch_size: int = 8,
    dtype: str = "float16",
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every record of the dataset at ``data`` (a prepared TFDS directory)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm import tqdm

    from sdxl_jax import conditioning
    from sdxl_jax.data import buckets as buckets_lib
    from sdxl_jax.data import images
    from sdxl_jax.data import pipeline as data_pipeline
    from sdxl_jax.inference import checkpoints, runtime
    from sdxl_jax.models import vae as vae_lib
    from sdxl_jax.weights import formats

    data, out = (data if is_remote(data) else Path(data)), Path(out)  # data may be gs://
    index = data_pipeline.load_index(data)
    key = f"bucket_{bucket_set}"
    if key not in index:
        raise ValueError(
            f"{data} has no side index for bucket set {bucket_set!r} (it has "
            f"{[k[7:] for k in index if k.startswith('bucket_')]}); re-run prepare with "
            f"--bucket-sets {bucket_set}"
        )
    bset = buckets_lib.bucket_set(bucket_set)
    record_bucket = index[key].astype(np.int64)
    heights, widths = index["height"], index["width"]
    source = data_pipeline.open_source(data)
    if len(source) != len(record_bucket):
        raise ValueError(f"{data}: {len(source)} records but the side index has {len(heights)}")

    mesh = runtime.make_mesh(jax.local_devices())  # this process's devices (one host builds it)
    n_dev = runtime.batch_devices(mesh)
    batch = runtime.padded(batch_size, n_dev)
    text, text_graph, text_state = load_text_encoders(checkpoint)
    vae_path = vae or checkpoint
    checkpoints.check_vae(vae_path)
    vae = formats.load(vae_path, ["vae"])["vae"]
    text_state = runtime.replicate(text_state, mesh)
    vae_graph, vae_state = nnx.split(vae)
    vae_state = runtime.replicate(vae_state, mesh)
    store = np.dtype(dtype)

    @jax.jit
    def encode(vae_state, text_state, pixels, ids):
        mean, logvar = nnx.merge(vae_graph, vae_state).encode(pixels)
        clip_l, clip_g = nnx.merge(text_graph, text_state)
        context, pooled = conditioning.encode_text(clip_l, clip_g, ids)
        # The diffusion-scale posterior: the affine map z -> (z - shift) * scale / std multiplies
        # the posterior's std by its slope, so the log-variance shifts by 2 log(slope).
        slope = vae_lib.to_diffusion_latents(
            jnp.ones(4), vae.config
        ) - vae_lib.to_diffusion_latents(jnp.zeros(4), vae.config)
        mean = vae_lib.to_diffusion_latents(mean, vae.config)
        logvar = logvar + 2 * jnp.log(slope)
        return mean, logvar, context, pooled

    row = np.full(len(record_bucket), -1, np.int64)
    orig = np.stack([heights, widths], -1).astype(np.int32)
    crops = np.zeros((len(record_bucket), 2), np.int32)
    target = np.zeros((len(record_bucket), 2), np.int32)
    skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(total=int((record_bucket >= 0).sum()), unit="img", desc="caching",
               disable=not progress, file=sys.stderr)  # fmt: skip
    for b in np.unique(record_bucket[record_bucket >= 0]):
        members = np.flatnonzero(record_bucket == b)
        bh, bw = bset.sizes[b]
        plans = {}  # record -> its centre crop, planned from the recorded size
        for j, i in enumerate(members):
            c = buckets_lib.plan_crop((int(heights[i]), int(widths[i])), (bh, bw), bucket=int(b),
                                      rng=None)  # fmt: skip
            plans[int(i)] = c
            crops[i], target[i], row[i] = c.crop_coords_top_left, (bh, bw), j
        folder = out / f"bucket_{b}"
        if (folder / "DONE").exists():
            bar.update(len(members))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        files = None
        for start in range(0, len(members), batch):
            ids_ = members[start : start + batch]
            full = np.concatenate([ids_, np.repeat(ids_[-1:], batch - len(ids_))])
            pixels, captions = [], []
            for i in full:
                rec, crop = source[int(i)], plans[int(i)]
                try:  # decoded only as large as the crop needs (JPEG draft scaling)
                    img = images.decode_rgb(rec["image"], min_size=crop.resized_size)
                except images.BadImage:
                    img = np.full((*crop.resized_size, 3), 127, np.uint8)
                    skipped += 1
                pixels.append(buckets_lib.apply_crop(img, crop))
                cap = rec["caption"]
                captions.append(cap.decode() if isinstance(cap, bytes) else str(cap))
            px = runtime.shard_batch(np.stack(pixels).astype(np.float32) / 127.5 - 1.0, mesh)
            ids = runtime.shard_batch(text.tokenize(captions), mesh)
            outs = [
                np.asarray(a)[: len(ids_)].astype(store)
                for a in encode(vae_state, text_state, px, ids)
            ]
            if files is None:
                files = {
                    name: np.lib.format.open_memmap(
                        folder / f"{name}.npy", "w+", store, (len(members), *a.shape[1:])
                    )
                    for name, a in zip(ARRAYS, outs, strict=True)
                }
            for name, a in zip(ARRAYS, outs, strict=True):
                files[name][start : start + len(ids_)] = a
            bar.update(len(ids_))
        for f in files.values():
            f.flush()
        (folder / "DONE").write_text("ok")
    bar.close()
    np.savez(out / INDEX, bucket=record_bucket, row=row, original_size=orig,
             crop_coords_top_left=crops, target_size=target)  # fmt: skip
    meta = dict(
        checkpoint=str(checkpoint), vae=str(vae_path), data=str(data), bucket_set=bucket_set,
        crop="centre",
        dtype=dtype, scaling_factor=vae.config.scaling_factor, undecodable=skipped,
        records=int((row >= 0).sum()), seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    (out / META).write_text(json.dumps(meta, indent=2))
    return meta


def load_text_encoders(checkpoint: str | Path) -> tuple[Any, Any, Any]:
    """(TextEncoders, graph, state) of a checkpoint's CLIP-L + bigG and tokenizers (fp32); a
    folder needs only text_encoder*/ and tokenizer*/, no UNet."""
    from flax import nnx

    from sdxl_jax import conditioning
    from sdxl_jax.weights import formats

    models = formats.load(checkpoint, ["text_encoder", "text_encoder_2"])
    root = Path(checkpoint)
    text = conditioning.TextEncoders(
        clip_l=models["text_encoder"],
        clip_g=models["text_encoder_2"],
        tokenizer_l=conditioning.load_tokenizer(root / "tokenizer"),
        tokenizer_g=conditioning.load_tokenizer(root / "tokenizer_2"),
    )
    graph, state = nnx.split((text.clip_l, text.clip_g))
    return text, graph, state


class CachedSource:
    """Random access to a cache: record i -> latents, embeddings and micro-conditioning."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = np.load(self.path / INDEX)
        self.bucket, self.row = index["bucket"], index["row"]
        self.original_size = index["original_size"]
        self.crop_coords_top_left = index["crop_coords_top_left"]
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
        b, r = int(self.bucket[i]), int(self.row[i])
        if r < 0:
            raise IndexError(f"record {i} is not in the cache (outside the bucket set)")
        arrays = self._bucket_arrays(b)
        out = {n: np.asarray(a[r]) for n, a in arrays.items()}
        out.update(
            original_size=self.original_size[i],
            crop_coords_top_left=self.crop_coords_top_left[i],
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdxl_jax.data.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--data", required=True, help="a dataset made by python -m sdxl_jax.data.prepare"
    )
    p.add_argument(
        "--checkpoint", required=True, help="SDXL base checkpoint (VAE + both text encoders)"
    )
    p.add_argument("--bucket-set", required=True, help="the bucket set training will use")
    p.add_argument("--vae", help="a different VAE: a folder with vae/ (default: the checkpoint's)")
    p.add_argument("--out", required=True,
                   help="cache folder; gs://BUCKET/PATH builds in $SDXL_LOCAL_DIR and uploads it "
                   "(training hosts fetch it); --data may be gs://, --checkpoint/--vae are "
                   "fetched")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call (8)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    args = p.parse_args(argv)
    from sdxl_jax import workdir as wl

    out = wl.local_mirror(args.out) if is_remote(args.out) else args.out  # built here first
    try:
        ckpt, vae = (wl.fetch(p) if p else p for p in (args.checkpoint, args.vae))
        meta = build_cache(args.data, ckpt, out, bucket_set=args.bucket_set, vae=vae,
                           batch_size=args.batch_size, dtype=args.dtype)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_remote(args.out):  # the metadata last: a cache without it is unfinished
        n = wl.publish(out, args.out, last=META)
        print(f"uploaded {n} files to {args.out}", file=sys.stderr)
    print(f"cached {meta['records']} records in {meta['seconds']} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
