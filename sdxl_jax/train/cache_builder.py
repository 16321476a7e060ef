"""Build a latent cache (the layout of :mod:`sdxl_jax.data.cache`) with the frozen encoders.

Each record of a prepared dataset is centre-cropped to its bucket (or cut at ``random_crops``
random windows, each kept with its coordinates), encoded by the frozen VAE
(diffusion-scale posterior mean and log-variance) and its caption by both text encoders (context
and pooled embedding); a bucket's rows go to memory-mapped ``.npy`` files, ``DONE`` last. The
data layer only reads caches (``CachedSource``); building one needs the models, so it lives here.

``python -m sdxl_jax.data.cache ...`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.data import batching, images
from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.data import cache as cache_lib
from sdxl_jax.workdir import is_remote

_TAG_CACHE_CROP = 11  # random stream of a record's cached crops
# (pixels [B, h, w, 3] in [-1, 1], token ids [B, 2, 77]) -> the four ARRAYS, B rows each
EncodeFn = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]


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
    random_crops: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Encode every record of the dataset at ``data`` (a prepared TFDS directory): its centre
    crop, or with ``random_crops`` = K > 0, K uniformly random crops (windows drawn from
    ``seed`` and the record, so a rebuild is identical), stored as K consecutive rows."""
    if random_crops < 0:
        raise ValueError(f"random_crops={random_crops}: need 0 (centre crops) or a count >= 1")
    from tqdm import tqdm

    data, out = (data if is_remote(data) else Path(data)), Path(out)  # data may be gs://
    bset, record_bucket, heights, widths, source = _open_dataset(data, bucket_set)
    vae_path = vae or checkpoint
    encode, batch, scaling_factor = make_encoder(checkpoint, vae_path, batch_size)
    store = np.dtype(dtype)

    row = np.full(len(record_bucket), -1, np.int64)
    orig = np.stack([heights, widths], -1).astype(np.int32)
    k = max(random_crops, 1)
    crops = np.zeros((len(record_bucket), k, 2), np.int32)
    target = np.zeros((len(record_bucket), 2), np.int32)
    skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(total=int((record_bucket >= 0).sum()) * k, unit="img", desc="caching",
               disable=not progress, file=sys.stderr)  # fmt: skip
    for b in np.unique(record_bucket[record_bucket >= 0]):
        members = np.flatnonzero(record_bucket == b)
        size = bset.sizes[b]
        plans = bucket_crops(members, heights, widths, size, int(b), random_crops, seed)
        for j, i in enumerate(members):
            crops[i] = [p.crop_coords_top_left for p in plans[j * k : (j + 1) * k]]
            target[i], row[i] = size, j * k
        folder = out / f"bucket_{b}"
        if (folder / "DONE").exists():
            bar.update(len(plans))
            continue
        rows = np.repeat(members, k)  # record-major: record j's crops are rows j*k .. j*k+k-1
        skipped += write_bucket(folder, rows, plans, source, encode, batch, store, bar.update)
    bar.close()
    np.savez(out / cache_lib.INDEX, bucket=record_bucket, row=row, original_size=orig,
             crop_coords_top_left=crops if random_crops else crops[:, 0],
             target_size=target)  # fmt: skip
    meta = dict(
        checkpoint=str(checkpoint), vae=str(vae_path), data=str(data), bucket_set=bucket_set,
        crop="random" if random_crops else "centre", crops_per_record=k, crop_seed=seed,
        dtype=dtype, scaling_factor=scaling_factor, undecodable=skipped,
        records=int((row >= 0).sum()), seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    (out / cache_lib.META).write_text(json.dumps(meta, indent=2))
    return meta


def _open_dataset(data: str | Path, bucket_set: str) -> tuple[Any, ...]:
    """(the bucket set, bucket per record [N] int64, heights [N], widths [N], the TFDS source),
    checked before any model loads."""
    index = batching.load_index(data)
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
    source = batching.open_source(data)
    if len(source) != len(record_bucket):
        raise ValueError(f"{data}: {len(source)} records but the side index has {len(heights)}")
    return bset, record_bucket, heights, widths, source


def bucket_crops(
    members: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    size: tuple[int, int],
    b: int,
    random_crops: int = 0,
    seed: int = 0,
) -> list[buckets_lib.Crop]:
    """The crops of ``members`` into bucket ``b`` of ``size``, planned from the recorded sizes:
    one centre crop each, or ``random_crops`` random ones each (record-major)."""
    out = []
    for i in members:
        orig = (int(heights[i]), int(widths[i]))
        if not random_crops:
            out.append(buckets_lib.plan_crop(orig, size, bucket=b, rng=None))
            continue
        rng = np.random.default_rng((seed, _TAG_CACHE_CROP, int(i)))
        out += [buckets_lib.plan_crop(orig, size, bucket=b, rng=rng) for _ in range(random_crops)]
    return out


def make_encoder(
    checkpoint: str | Path, vae_path: str | Path, batch_size: int
) -> tuple[EncodeFn, int, float]:
    """(encode, padded batch, VAE scaling factor): the frozen encoders compiled once, replicated
    on this process's devices (one host builds a cache), a batch split over them."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdxl_jax import conditioning
    from sdxl_jax.inference import checkpoints, runtime
    from sdxl_jax.models import vae as vae_lib
    from sdxl_jax.weights import formats

    mesh = runtime.make_mesh(jax.local_devices())
    batch = runtime.padded(batch_size, runtime.batch_devices(mesh))
    text, text_graph, text_state = load_text_encoders(checkpoint)
    checkpoints.check_vae(vae_path)
    vae = formats.load(vae_path, ["vae"])["vae"]
    text_state = runtime.replicate(text_state, mesh)
    vae_graph, vae_state = nnx.split(vae)
    vae_state = runtime.replicate(vae_state, mesh)

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

    def run(pixels: np.ndarray, captions: Sequence[str]) -> list[np.ndarray]:
        px = runtime.shard_batch(pixels, mesh)
        ids = runtime.shard_batch(text.tokenize(list(captions)), mesh)
        return [np.asarray(a) for a in encode(vae_state, text_state, px, ids)]

    return run, batch, vae.config.scaling_factor


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


def load_batch(
    source: Any, ids: np.ndarray, crops: Sequence[buckets_lib.Crop]
) -> tuple[np.ndarray, list[str], int]:
    """(pixels [B, h, w, 3] float32 in [-1, 1], captions, undecodable count) of records
    ``ids`` cut by ``crops`` (one each); an undecodable image becomes mid-grey."""
    pixels, captions, bad = [], [], 0
    for i, crop in zip(ids, crops, strict=True):
        rec = source[int(i)]
        try:  # decoded only as large as the crop needs (JPEG draft scaling)
            img = images.decode_rgb(rec["image"], min_size=crop.resized_size)
        except images.BadImage:
            img = np.full((*crop.resized_size, 3), 127, np.uint8)
            bad += 1
        pixels.append(buckets_lib.apply_crop(img, crop))
        cap = rec["caption"]
        captions.append(cap.decode() if isinstance(cap, bytes) else str(cap))
    return np.stack(pixels).astype(np.float32) / 127.5 - 1.0, captions, bad


def write_bucket(
    folder: Path,
    members: np.ndarray,
    crops: Sequence[buckets_lib.Crop],
    source: Any,
    encode: EncodeFn,
    batch: int,
    store: np.dtype,
    advance: Callable[[int], Any],
) -> int:
    """Encode one bucket's records into ``folder/{ARRAYS}.npy`` (a row per entry of ``members``
    with its crop, in order), then ``DONE``; returns how many images were undecodable (a batch's
    padding repeats its last record, and counts again)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, bad = None, 0
    for start in range(0, len(members), batch):
        ids = members[start : start + batch]
        full = np.concatenate([ids, np.repeat(ids[-1:], batch - len(ids))])
        plans = list(crops[start : start + batch])
        plans += [plans[-1]] * (batch - len(ids))
        pixels, captions, n_bad = load_batch(source, full, plans)
        bad += n_bad
        outs = [a[: len(ids)].astype(store) for a in encode(pixels, captions)]
        if files is None:
            files = {
                name: np.lib.format.open_memmap(
                    folder / f"{name}.npy", "w+", store, (len(members), *a.shape[1:])
                )
                for name, a in zip(cache_lib.ARRAYS, outs, strict=True)
            }
        for name, a in zip(cache_lib.ARRAYS, outs, strict=True):
            files[name][start : start + len(ids)] = a
        advance(len(ids))
    for f in files.values():
        f.flush()
    (folder / "DONE").write_text("ok")
    return bad


def main(argv: list[str] | None = None) -> int:
    """``python -m sdxl_jax.data.cache``: build a cache, locally or into a bucket."""
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.data.cache",
        description=cache_lib.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument("--random-crops", type=int, default=0, metavar="K",
                   help="cache K random crops per record with their coordinates (training draws "
                   "one per step) instead of one centre crop (0, the default)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (0)")
    args = p.parse_args(argv)
    from sdxl_jax import workdir as wl

    out = wl.local_mirror(args.out) if is_remote(args.out) else args.out  # built here first
    try:
        ckpt, vae = (wl.fetch(p) if p else p for p in (args.checkpoint, args.vae))
        meta = build_cache(args.data, ckpt, out, bucket_set=args.bucket_set, vae=vae,
                           batch_size=args.batch_size, dtype=args.dtype,
                           random_crops=args.random_crops, seed=args.seed)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_remote(args.out):  # the metadata last: a cache without it is unfinished
        n = wl.publish(out, args.out, last=cache_lib.META)
        print(f"uploaded {n} files to {args.out}", file=sys.stderr)
    print(f"cached {meta['records']} records in {meta['seconds']} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
