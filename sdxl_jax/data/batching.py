"""Batching by bucket: which records form global batch ``s``, from the side index alone.

For each epoch, shuffle the records of each bucket, cut them into global batches (remainders
dropped or filled by repetition), and shuffle the order of the batches, all with rngs seeded by
``(seed, epoch, ...)``: every host computes the same batches without communicating. ``describe``
reports steps per epoch and the bucket histogram without decoding a single image.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.workdir import as_path

INDEX_FILE = "sdxl_index.npz"
REMAINDERS = ("drop", "repeat")

# Domain tags keep the rng streams apart, e.g. (epoch 3, bucket 5) vs (step 3, position 5).
_TAG_SHUFFLE, _TAG_ORDER, _TAG_CROP, _TAG_REPLACE, _TAG_CAPTION = 0, 1, 2, 3, 4


# ----------------------------------------------------------------------------- epoch batches


def epoch_batches(
    buckets: np.ndarray, global_batch: int, *, seed: int, epoch: int, remainder: str = "drop"
) -> list[tuple[int, np.ndarray]]:
    """One epoch: ``[(bucket, record indices [global_batch])]`` in the order they are used.

    ``buckets[i]`` is record i's bucket; -1 leaves it out. Each bucket's records are shuffled
    with an rng from ``(seed, epoch, bucket)`` and cut into global batches; the order of all
    batches is shuffled with an rng from ``(seed, epoch)``.
    """
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder={remainder!r}: use one of {REMAINDERS}")
    buckets = np.asarray(buckets)
    order = np.argsort(buckets, kind="stable")
    order = order.astype(np.int32) if len(order) < 2**31 else order  # halves an epoch's memory
    sorted_buckets = buckets[order]
    values, starts = np.unique(sorted_buckets, return_index=True)
    batches = []
    for b, members in zip(values, np.split(order, starts[1:]), strict=True):
        if b < 0:
            continue
        members = np.random.default_rng((seed, _TAG_SHUFFLE, epoch, int(b))).permutation(members)
        n_full, rest = divmod(len(members), global_batch)
        for i in range(n_full):
            batches.append((int(b), members[i * global_batch : (i + 1) * global_batch]))
        if rest and remainder == "repeat":
            fill = np.resize(members, global_batch - rest)  # cycles through the bucket
            batches.append((int(b), np.concatenate([members[n_full * global_batch :], fill])))
    batch_order = np.random.default_rng((seed, _TAG_ORDER, epoch)).permutation(len(batches))
    return [batches[i] for i in batch_order]


def batch_summary(
    buckets: np.ndarray,
    global_batch: int,
    *,
    remainder: str = "drop",
    repeats: np.ndarray | None = None,
) -> dict:
    """Records, batches, dropped and repeated records per bucket, and steps per epoch (with
    ``repeats``: record uses, and ``distinct_records``).

    The counts do not depend on the shuffle, so no epoch's batches are drawn.
    """
    buckets = np.asarray(buckets)
    distinct = None
    if repeats is not None and np.any(np.asarray(repeats) != 1):
        distinct = int((buckets >= 0).sum())
        buckets = np.repeat(buckets, repeats)
    values, counts = np.unique(buckets[buckets >= 0], return_counts=True)
    rows = []
    for b, n in zip(values.tolist(), counts.tolist(), strict=True):
        n_full, rest = divmod(n, global_batch)
        repeat = remainder == "repeat" and rest > 0
        rows.append(
            {
                "bucket": b,
                "records": n,
                "batches": n_full + int(repeat),
                "dropped": 0 if repeat else rest,
                "repeated": global_batch - rest if repeat else 0,
            }
        )
    steps = sum(r["batches"] for r in rows)
    return {
        "global_batch": global_batch,
        "remainder": remainder,
        "buckets": rows,
        "records": int(counts.sum()),
        "steps_per_epoch": steps,
        "records_per_epoch": steps * global_batch,
        "dropped": sum(r["dropped"] for r in rows),
        "repeated": sum(r["repeated"] for r in rows),
        **({} if distinct is None else {"distinct_records": distinct}),
    }


class BatchSchedule:
    """Global step -> (bucket, record indices [global_batch]); epochs computed on demand.

    ``repeats[i]`` (default 1) is how often record i is used per epoch (kohya's ``N_name``
    folders): each use is shuffled into its bucket's batches like a record of its own.
    """

    def __init__(
        self,
        buckets: np.ndarray,
        global_batch: int,
        *,
        seed: int,
        remainder: str,
        repeats: np.ndarray | None = None,
    ):
        self.buckets = np.asarray(buckets, np.int32)  # [N], -1: left out
        self.global_batch, self.seed, self.remainder = global_batch, seed, remainder
        self._uses = None  # use u of the epoch is record _uses[u]
        if repeats is not None and np.any(np.asarray(repeats) != 1):
            repeats = np.asarray(repeats, np.int64)
            if repeats.shape != self.buckets.shape or repeats.min() < 0:
                raise ValueError(f"repeats must be [{len(self.buckets)}] counts >= 0")
            self._uses = np.repeat(np.arange(len(self.buckets), dtype=np.int32), repeats)
        self._use_buckets = self.buckets if self._uses is None else self.buckets[self._uses]
        self.summary = batch_summary(buckets, global_batch, remainder=remainder, repeats=repeats)
        self.steps_per_epoch = self.summary["steps_per_epoch"]
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no global batch of {global_batch} fits any bucket "
                f"({self.summary['records']} records in range, largest bucket "
                f"{max((r['records'] for r in self.summary['buckets']), default=0)}): "
                "use remainder='repeat', a smaller global batch, or more data"
            )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):  # worker processes compute the epochs they need themselves
        return {**self.__dict__, "_epochs": {}}

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket per batch [S], indices [S, global_batch]) for one epoch, cached.

        Safe under Grain's reader threads: the cache is replaced, never mutated, and at an
        epoch boundary both epochs stay cached.
        """
        epochs = self._epochs
        if epoch not in epochs:
            batches = epoch_batches(
                self._use_buckets,
                self.global_batch,
                seed=self.seed,
                epoch=epoch,
                remainder=self.remainder,
            )
            indices = np.stack([ix for _, ix in batches])
            if self._uses is not None:
                indices = self._uses[indices]
            entry = (np.array([b for b, _ in batches]), indices)
            keep = {e: v for e, v in epochs.items() if e in (epoch - 1, epoch + 1)}
            self._epochs = epochs = {**keep, epoch: entry}
        return epochs[epoch]

    def at(self, step: int) -> tuple[int, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        bucket_of, indices = self.epoch_order(epoch)
        return int(bucket_of[i]), indices[i]


# ----------------------------------------------------------------------------- side index


def load_index(path: str | Path) -> dict[str, np.ndarray]:
    """``DIR/sdxl_index.npz`` as a dict of arrays (written by ``sdxl_jax.data.prepare``); ``DIR``
    may be a bucket (``gs://...``), like the TFDS dataset beside it."""
    file = as_path(path) / INDEX_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"{file} not found: {path} is not a prepared dataset; run "
            "`python -m sdxl_jax.data.prepare --source KIND:LOCATION --out DIR` first"
        )
    with np.load(io.BytesIO(file.read_bytes())) as z:
        return {k: z[k] for k in z.files}


def open_source(path: str | Path) -> Any:
    """Random access to the prepared TFDS dataset, images as undecoded bytes."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(path))
    return builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})


def record_buckets(
    index: Mapping[str, np.ndarray], bucket_set: buckets_lib.BucketSet, *, drop_small: bool
) -> tuple[np.ndarray, dict[str, int]]:
    """Each record's bucket for batching (-1: left out) and the counts of what was left out."""
    column = "bucket_" + bucket_set.name
    if column not in index:
        sets = sorted(k[len("bucket_") :] for k in index if k.startswith("bucket_"))
        raise KeyError(
            f"the side index has no bucket set {bucket_set.name!r} (it has {sets}): re-run "
            f"prepare with --bucket-sets including {bucket_set.name}, or pick one of those"
        )
    b = np.asarray(index[column]).astype(np.int64)
    excluded = {"out_of_range": int((b < 0).sum())}
    if drop_small:
        sizes = np.asarray(bucket_set.sizes)  # [K, 2]
        h, w = np.asarray(index["height"]), np.asarray(index["width"])
        bh, bw = sizes[np.maximum(b, 0), 0], sizes[np.maximum(b, 0), 1]
        small = (b >= 0) & ((h < bh) | (w < bw))
        excluded["small"] = int(small.sum())
        b = np.where(small, -1, b)
    return b, excluded


def _uses(summary: dict) -> str:
    n = summary.get("distinct_records")
    return "" if n is None else f" (uses of {n} records, with their repeats)"


def format_summary(summary: dict, bucket_set: buckets_lib.BucketSet) -> str:
    """The bucket histogram and steps per epoch as a small table."""
    ex = summary.get("excluded", {})
    lines = [
        f"bucket set {bucket_set.name} ({len(bucket_set.sizes)} buckets), global batch "
        f"{summary['global_batch']}, remainder {summary['remainder']}",
        f"records: {summary['records']} in the plan{_uses(summary)}; left out: "
        f"{ex.get('out_of_range', 0)} outside the aspect range"
        + (f", {ex['small']} smaller than their bucket (drop_small)" if "small" in ex else ""),
        f"{'bucket':>6} {'h x w':>11} {'records':>8} {'batches':>8} {'dropped':>8} {'repeated':>8}",
    ]
    for r in summary["buckets"]:
        h, w = bucket_set.sizes[r["bucket"]]
        note = "  <- all dropped" if r["batches"] == 0 else ""
        lines.append(
            f"{r['bucket']:>6} {f'{h} x {w}':>11} {r['records']:>8} {r['batches']:>8} "
            f"{r['dropped']:>8} {r['repeated']:>8}{note}"
        )
    lines.append(
        f"steps per epoch: {summary['steps_per_epoch']} ({summary['records_per_epoch']} "
        f"examples per epoch; {summary['dropped']} records dropped, {summary['repeated']} "
        "repeated)"
    )
    return "\n".join(lines)


def describe(
    path: str | Path,
    bucket_set: str,
    global_batch: int,
    *,
    remainder: str = "drop",
    drop_small: bool = False,
    show: int = 0,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Steps per epoch and the bucket histogram of a prepared dataset, from its side index."""
    bset = buckets_lib.bucket_set(bucket_set)
    index = load_index(path)
    b, excluded = record_buckets(index, bset, drop_small=drop_small)
    repeats = index.get("repeats")
    summary = batch_summary(b, global_batch, remainder=remainder, repeats=repeats)
    summary["excluded"] = excluded
    text = format_summary(summary, bset)
    if show:
        schedule = BatchSchedule(b, global_batch, seed=seed, remainder=remainder, repeats=repeats)
        keys = index.get("key")
        summary["first_steps"] = []
        for step in range(show):
            bucket, ix = schedule.at(step)
            summary["first_steps"].append({"step": step, "bucket": bucket, "indices": ix.tolist()})
            ids = [str(keys[i]) for i in ix] if keys is not None else ix.tolist()
            text += f"\nstep {step}: bucket {bucket} {bset.sizes[bucket]}: {ids}"
    if verbose:
        print(text)
    return summary
