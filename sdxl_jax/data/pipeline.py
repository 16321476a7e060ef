"""Grain input pipeline: one aspect bucket per global batch, each host reads its own slice.

The order of the data is a pure function of ``(seed, step)``: for each epoch its batches
(shuffle the records of each bucket, cut them into global batches, shuffle the batches: see
``sdxl_jax.data.batching``) that every host computes alike without communicating. Global step
``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``; process ``p`` of
``P`` reads rows ``[p * B / P, (p + 1) * B / P)`` of it. So the global step is the whole
iterator state: it is saved with orbax ``JsonSave`` beside the model and restores on any number
of hosts.

Random crops and flips draw from an rng seeded by ``(seed, step, position in the global batch)``,
so they do not depend on the number of hosts or Grain workers either. Decoding, crop, flip and
normalisation run in Grain worker processes (``num_workers=0``: in-process).

Exact sequences depend on numpy's ``Generator.permutation`` (numpy is pinned).

``python -m sdxl_jax.data.pipeline --data DIR --bucket-set S --global-batch B [--show N]``
prints steps per epoch and the bucket histogram from the side index alone (no decoding).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from sdxl_jax.data import buckets as buckets_lib
from sdxl_jax.data import images
from sdxl_jax.data.batching import (
    _TAG_CAPTION,
    _TAG_CROP,
    _TAG_REPLACE,
    INDEX_FILE,  # noqa: F401 (callers find the side index here)
    REMAINDERS,
    BatchSchedule,
    describe,
    format_summary,
    load_index,
    open_source,
    record_buckets,
)
from sdxl_jax.data.cache import CachedSource

STATE_FORMAT = "sdxl_jax.data.pipeline/1"
MAX_REPLACEMENTS = 16


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline reads and how. ``DataConfig(**config.data)`` from an ml_collections config.

    remainder: what happens to the last, partial batch of a bucket in an epoch: "drop" it, or
      "repeat" (fill it with records of the same bucket from the start of its shuffled order).
    drop_small: leave out records smaller than their bucket in either side (they would be
      upscaled); the side index decides, so the histogram shows them.
    image_dtype: "float32" normalised to [-1, 1], or "uint8" (normalise on device; 4x less
      host memory and inter-process traffic).
    prefetch: batches buffered per worker process (and read-ahead in-process).
    cache: a cache folder made by ``python -m sdxl_jax.data.cache`` for this dataset and bucket
      set: batches then carry the stored latents and text embeddings instead of images (one
      fixed crop per record, or one of its K cached random crops drawn per step; random_crop
      and flip do not apply).
    caption_dropout: the probability that an example's caption is replaced by "" (kohya's
      caption_dropout_rate; the empty caption is encoded, unlike the step's cond_dropout).
    shuffle_tags: shuffle the comma-separated tags of each caption, keeping the first
      ``keep_tags`` in place (kohya's shuffle_caption / keep_tokens); ``tag_separator``
      splits them, and they are joined with ", ".
    Caption dropout and tag shuffling change captions per step, so they need online text
    encoding (no cache).
    """

    path: str = ""
    bucket_set: str = "sdxl_1024"
    global_batch_size: int = 8
    seed: int = 0
    remainder: str = "drop"
    random_crop: bool = True
    flip: bool = False
    num_workers: int = 0
    prefetch: int = 2
    read_threads: int = 4
    drop_small: bool = False
    image_dtype: str = "float32"
    cache: str = ""
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_separator: str = ","

    def __post_init__(self):
        if self.remainder not in REMAINDERS:
            raise ValueError(f"remainder={self.remainder!r}: use one of {REMAINDERS}")
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size={self.global_batch_size}: must be >= 1")
        if self.num_workers < 0 or self.prefetch < 1 or self.read_threads < 0:
            raise ValueError("num_workers >= 0, prefetch >= 1 and read_threads >= 0 are needed")
        if self.image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype={self.image_dtype!r}: use 'float32' or 'uint8'")
        problems = caption_problems(
            self.caption_dropout, self.shuffle_tags, self.keep_tags, self.cache
        )
        if problems or not self.tag_separator:
            raise ValueError("; ".join(problems or ["data.tag_separator is empty"]))


def caption_problems(dropout: float, shuffle: bool, keep_tags: int, cache: str) -> list[str]:
    """kohya's caption options: in range, and only with online text encoding."""
    problems = []
    if not 0 <= dropout <= 1:
        problems.append(f"data.caption_dropout {dropout}: need a probability in [0, 1]")
    if keep_tags < 0:
        problems.append(f"data.keep_tags {keep_tags}: need >= 0")
    if (dropout > 0 or shuffle) and cache:
        problems.append(
            f"data.caption_dropout / data.shuffle_tags change captions every step, but "
            f"data.cache={cache!r} encodes them once: set data.cache='' (online text)"
        )
    return problems


def process_caption(caption: str, cfg: DataConfig, rng: np.random.Generator) -> str:
    """Caption dropout, then tag shuffling (kohya's order): see ``DataConfig``."""
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    if not cfg.shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.strip().split(cfg.tag_separator)]
    keep, rest = tags[: cfg.keep_tags], tags[cfg.keep_tags :]
    return ", ".join(keep + [rest[i] for i in rng.permutation(len(rest))])


# ----------------------------------------------------------------------------- examples


class _ExampleLoader:
    """Element k of the host's stream -> one decoded, cropped example (runs in Grain workers)."""

    def __init__(
        self,
        source,
        schedule: BatchSchedule,
        sizes,
        cfg: DataConfig,
        offset: int,
        local_batch: int,
        loss_weight: np.ndarray | None = None,
    ):
        self.source, self.schedule, self.sizes, self.cfg = source, schedule, sizes, cfg
        self.offset, self.local_batch, self.loss_weight = offset, local_batch, loss_weight
        self._members: dict[int, np.ndarray] = {}

    def _replacement(self, bucket: int, step: int, position: int, attempt: int) -> int:
        if bucket not in self._members:
            self._members[bucket] = np.flatnonzero(self.schedule.buckets == bucket)
        rng = np.random.default_rng((self.cfg.seed, _TAG_REPLACE, step, position, attempt))
        return int(rng.choice(self._members[bucket]))

    def __call__(self, k: int) -> dict[str, Any]:
        step, j = divmod(int(k), self.local_batch)
        position = self.offset + j  # in the global batch: independent of the host count
        bucket, indices = self.schedule.at(step)
        index, replaced = int(indices[position]), False
        weight = np.float32(1.0 if self.loss_weight is None else self.loss_weight[index])
        if self.cfg.cache:  # latents and embeddings, encoded once (sdxl_jax.data.cache)
            k = 0  # which of the record's cached crops: drawn per step and batch position
            crops = getattr(self.source, "crops_per_record", 1)
            if crops > 1:
                rng = np.random.default_rng((self.cfg.seed, _TAG_CROP, step, position))
                k = int(rng.integers(crops))
            return {**self.source.get(index, k), "index": index, "replaced": False, "step": step,
                    "loss_weight": weight}  # fmt: skip
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                record = self.source[index]
                # Plan from the recorded size (after EXIF rotation), then decode only as large as
                # the crop needs: JPEGs decode at 1/2, 1/4 or 1/8 scale when that suffices.
                size = (int(record["height"]), int(record["width"]))
                rng = np.random.default_rng((self.cfg.seed, _TAG_CROP, step, position))
                flip = bool(self.cfg.flip and rng.random() < 0.5)
                crop = buckets_lib.plan_crop(
                    size,
                    self.sizes[bucket],
                    bucket=bucket,
                    rng=rng if self.cfg.random_crop else None,
                    flip=flip,
                )
                image = images.decode_rgb(record["image"], min_size=crop.resized_size)
                break
            except images.BadImage:
                replaced = True
                index = self._replacement(bucket, step, position, attempt)
        else:
            raise RuntimeError(
                f"{MAX_REPLACEMENTS + 1} records of bucket {bucket} failed to decode: the data "
                "changed since prepare; re-run `python -m sdxl_jax.data.prepare`"
            )
        pixels = buckets_lib.apply_crop(image, crop)  # [h, w, 3] uint8
        if self.cfg.image_dtype == "float32":
            pixels = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        caption = record["caption"]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if self.cfg.caption_dropout > 0 or self.cfg.shuffle_tags:
            rng = np.random.default_rng((self.cfg.seed, _TAG_CAPTION, step, position))
            caption = process_caption(caption, self.cfg, rng)
        return {
            "image": pixels,
            "caption": caption,
            "original_size": np.asarray(size, np.int32),
            "crop_coords_top_left": np.asarray(crop.crop_coords_top_left, np.int32),
            "target_size": np.asarray(crop.target_size, np.int32),
            "bucket": bucket,
            "index": index,
            "replaced": replaced,
            "loss_weight": weight,
            "step": step,
        }


def _collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    first = examples[0]
    assert all(e["step"] == first["step"] for e in examples), "a batch spans two steps"
    stack = lambda key, dtype=None: np.stack([np.asarray(e[key], dtype) for e in examples])
    if "latent_mean" in first:  # cache mode: every field is an array
        out = {k: stack(k) for k in first if k != "step"}
        return {**out, "bucket": out["bucket"].astype(np.int32), "step": int(first["step"])}
    return {
        "image": stack("image"),  # [B_local, h, w, 3]
        "caption": np.array([e["caption"] for e in examples], dtype=str),  # [B_local]
        "original_size": stack("original_size"),  # [B_local, 2] (h, w)
        "crop_coords_top_left": stack("crop_coords_top_left"),  # [B_local, 2] (top, left)
        "target_size": stack("target_size"),  # [B_local, 2] (h, w)
        "bucket": stack("bucket", np.int32),  # [B_local]
        "index": stack("index", np.int32),  # [B_local] record indices
        "replaced": stack("replaced", bool),  # [B_local] failed to decode, replaced
        "loss_weight": stack("loss_weight", np.float32),  # [B_local] (prior preservation)
        "step": int(first["step"]),
    }


# ----------------------------------------------------------------------------- iterator


def host_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """Rows of each global batch that process ``process_index`` of ``process_count`` reads."""
    if global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} does not divide over {process_count} hosts: use a "
            f"multiple of {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


class DataIterator(Iterator[dict[str, Any]]):
    """Host-local numpy batches from global step ``step`` on; ``get_state``/``set_state``.

    Batches: "image" [B_local, h, w, 3] (float32 in [-1, 1] or uint8), "caption" [B_local] str,
    "original_size" / "crop_coords_top_left" / "target_size" int32 [B_local, 2] (h, w order),
    "bucket" / "index" int32 [B_local], "replaced" bool [B_local], "loss_weight" float32
    [B_local] (the records' weights: 1 but for prior-preservation images), "step" int.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        process_index: int,
        process_count: int,
        start_step: int = 0,
        source: Any = None,
        index: Mapping[str, np.ndarray] | None = None,
        verbose: bool = True,
    ):
        self.cfg, self.process_index, self.process_count = cfg, process_index, process_count
        self._rows = host_slice(cfg.global_batch_size, process_index, process_count)
        self.bucket_set = buckets_lib.bucket_set(cfg.bucket_set)
        index = load_index(cfg.path) if index is None else index
        if source is None and cfg.cache:
            source = CachedSource(cfg.cache)
            if source.meta["bucket_set"] != cfg.bucket_set:
                raise ValueError(
                    f"cache {cfg.cache} was built for bucket set {source.meta['bucket_set']!r}, "
                    f"not {cfg.bucket_set!r}: rebuild it or change data.bucket_set"
                )
        self.source = open_source(cfg.path) if source is None else source
        record_b, excluded = record_buckets(index, self.bucket_set, drop_small=cfg.drop_small)
        if len(self.source) != len(record_b):
            raise ValueError(
                f"the source has {len(self.source)} records but the side index {len(record_b)}: "
                "they come from different prepare runs; re-run prepare into an empty directory"
            )
        self.schedule = BatchSchedule(
            record_b,
            cfg.global_batch_size,
            seed=cfg.seed,
            remainder=cfg.remainder,
            repeats=index.get("repeats"),
        )
        self.loss_weight = index.get("loss_weight")
        self.summary = {**self.schedule.summary, "excluded": excluded}
        self.steps_per_epoch = self.schedule.steps_per_epoch
        self.num_replaced = 0
        if verbose and process_index == 0:
            print(format_summary(self.summary, self.bucket_set))
        self._it = None
        self._start(start_step)

    def _start(self, step: int) -> None:
        """Point at ``step``; the Grain pipeline (and its workers) starts on the next batch."""
        self.close()
        self.step = step

    def _pipeline(self) -> grain.IterDataset:
        local = self._rows.stop - self._rows.start
        loader = _ExampleLoader(
            self.source,
            self.schedule,
            self.bucket_set.sizes,
            self.cfg,
            self._rows.start,
            local,
            self.loss_weight,
        )
        stop = (sys.maxsize // local) * local
        ds = grain.MapDataset.range(self.step * local, stop).map(loader)
        read = grain.ReadOptions(
            num_threads=self.cfg.read_threads,
            prefetch_buffer_size=max(self.cfg.prefetch, self.cfg.read_threads),
        )
        ds = ds.batch(local, batch_fn=_collate).to_iter_dataset(read)
        if self.cfg.num_workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app.run
                flags.FLAGS.mark_as_parsed()  # (scripts, notebooks, pytest) the defaults do
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.cfg.num_workers, per_worker_buffer_size=self.cfg.prefetch
                )
            )
        return ds

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self._pipeline())
        # Worker batches arrive in Grain shared-memory arrays: copy them into ordinary arrays so
        # each shared block is released now, not at interpreter exit (leak warnings otherwise).
        batch = {k: np.array(v) if type(v).__name__ == "SharedMemoryArray" else v
                 for k, v in next(self._it).items()}  # fmt: skip
        assert batch["step"] == self.step, (batch["step"], self.step)
        self.step += 1
        n = int(batch["replaced"].sum())
        if n:
            self.num_replaced += n
            print(
                f"data: step {batch['step']}: {n} undecodable images replaced "
                f"({self.num_replaced} so far)"
            )
        return batch

    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def get_state(self) -> dict[str, Any]:
        """JSON-able: the next global step plus what must match to resume."""
        return {
            "format": STATE_FORMAT,
            "step": int(self.step),
            "seed": self.cfg.seed,
            "global_batch_size": self.cfg.global_batch_size,
            "bucket_set": self.cfg.bucket_set,
            "remainder": self.cfg.remainder,
            "drop_small": self.cfg.drop_small,
            "records": self.summary["records"],
            "steps_per_epoch": self.steps_per_epoch,
        }

    def set_state(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Resume at ``state["step"]``; ``strict`` checks the batches are the ones saved."""
        if strict:
            mine = self.get_state()
            diff = {k: (state[k], mine[k]) for k in mine if k != "step" and state.get(k) != mine[k]}
            if diff:
                raise ValueError(
                    f"the saved data state does not match this pipeline (saved, now): {diff}; "
                    "restore with the data config it was saved with, or pass strict=False to "
                    f"resume at step {state['step']} of a different plan"
                )
        self._start(int(state["step"]))

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __enter__(self) -> DataIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_iterator(
    cfg: DataConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    start_step: int = 0,
    source: Any = None,
    index: Mapping[str, np.ndarray] | None = None,
    verbose: bool = True,
) -> DataIterator:
    """Host-local batches for ``cfg`` from ``start_step``; hosts default to jax's.

    ``source`` (random access: ``len``, ``[i]`` -> {"image": bytes, "caption", ...}) and
    ``index`` ({"height", "width", "bucket_<set>"} arrays aligned with it) default to the
    prepared dataset at ``cfg.path``.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    kwargs = dict(start_step=start_step, source=source, index=index, verbose=verbose)
    return DataIterator(cfg, process_index=process_index, process_count=process_count, **kwargs)


def to_global(batch: Mapping[str, Any], mesh, batch_axes: str | Sequence[str] = "data") -> dict:
    """Host-local numpy batch -> global jax arrays sharded over ``batch_axes`` of ``mesh``.

    Numeric arrays become ``jax.Array`` s (dim 0 split over the batch axes, the rest
    replicated); captions (strings) and the scalar step stay host-local.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.ndim and value.dtype.kind in "biuf":
            global_rows = value.shape[0] * jax.process_count()
            if global_rows % shards:
                raise ValueError(
                    f"{key}: global batch {global_rows} does not divide over the {shards} "
                    f"devices of mesh axes {axes}: use a global batch that is a multiple of "
                    f"{shards}"
                )
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- checkpoint


def save_args(iterator: DataIterator):
    """The data item of an orbax ``Composite`` save: ``data=pipeline.save_args(it)``."""
    import orbax.checkpoint as ocp

    return ocp.args.JsonSave(iterator.get_state())


def restore_args():
    """The data item of an orbax ``Composite`` restore; pass the result to ``it.set_state``."""
    import orbax.checkpoint as ocp

    return ocp.args.JsonRestore()


def save_state(directory: str | Path, iterator: DataIterator) -> None:
    """Write the iterator state on its own (every process calls this; process 0 writes)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        ckptr.save(Path(directory).absolute(), args=save_args(iterator), force=True)


def load_state(directory: str | Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(Path(directory).absolute(), args=restore_args())


def restore(
    directory: str | Path, cfg: DataConfig, *, strict: bool = True, **kwargs
) -> DataIterator:
    """An iterator resumed from ``save_state(directory, ...)``, on any number of hosts."""
    state = load_state(directory)
    it = make_iterator(cfg, **kwargs)
    it.set_state(state, strict=strict)
    return it


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.data.pipeline",
        description="Steps per epoch and the bucket histogram of a prepared dataset.",
    )
    p.add_argument("--data", required=True, help="a directory written by sdxl_jax.data.prepare")
    p.add_argument("--bucket-set", required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--remainder", choices=REMAINDERS, default="drop")
    p.add_argument("--drop-small", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="print the first N steps' record keys")
    args = p.parse_args(argv)
    extra = {k: getattr(args, k) for k in ("remainder", "drop_small", "show", "seed")}
    try:
        describe(args.data, args.bucket_set, args.global_batch, **extra)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
