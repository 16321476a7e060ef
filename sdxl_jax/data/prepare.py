"""Turn an image-caption source into the TFDS dataset that ``sdxl_jax.data.pipeline`` reads.

  python -m sdxl_jax.data.prepare --source KIND:LOCATION --out DIR [options]

KIND:LOCATION[?OPTION=VALUE&...] is one of (each in detail at the end):
  folder:DIR                          images + same-named .txt captions, recursive
  jsonl:FILE | csv:FILE | parquet:FILE  manifest rows ?image=COL&caption=COL&key=COL&root=DIR
  webdataset:'shards-{000..009}.tar'  tar shards (glob or brace list) ?caption=JSON_KEY
  tfds:NAME[/CONFIG][:VERSION]?data_dir=DIR&split=train&image=image&caption=captions/text
  tfds:DATASET_DIR                    a generated TFDS dataset (never downloads)
  synthetic:N[?seed=S]                the embedded coloured-shapes dataset

DIR then holds an ordinary TFDS dataset (``tfds.builder_from_directory(DIR)``, split "train",
ArrayRecord shards, disable_shuffling: record i is the i-th kept source record) with features
  image     the source's encoded bytes, unchanged, for JPEG and PNG (EXIF and all); any other
            format (WebP, GIF, BMP, TIFF, ...) and TFDS pixel arrays are stored as PNG of
            images.decode_rgb's output (EXIF orientation applied, alpha on white), since
            tfds.features.Image names only jpeg/png (TensorFlow's decoder reads no WebP/TIFF).
            Read with decoders={"image": tfds.decode.SkipDecoding()} and images.decode_rgb.
  caption   the first non-empty caption, whitespace-stripped ("" if kept empty)
  captions  all non-empty captions of the record (a Sequence(Text); one for most sources)
  height, width  int32, after EXIF orientation;  key  the source's id for the record
and beside it
  sdxl_index.npz  "key" [N] str, "height"/"width" [N] int32, "source_index" [N] int64,
                  "repeats" [N] int32 (uses per epoch), "loss_weight" [N] float32, and per
                  bucket set S "bucket_S" [N] int16 (-1: aspect out of S's range); aligned with
                  the records, so batches are planned without reading an image
  prepare_report.json  totals, skips per reason (with examples), counted conditions, caption
                  token method, bucket histograms, image formats, timings.

Bad records never stop a build; each is skipped with a reason: empty_file, not_an_image,
truncated, too_large, unsupported_mode (from images.decode_rgb), missing_image, read_error,
missing_caption, empty_caption (unless --on-empty-caption keep), aspect_out_of_range (--on-aspect
skip), too_small (--min-side), duplicate_key (the first record with a key wins),
changed_during_build (the source file changed between checking and writing). Counted, not
skipped: small_image (smaller than its bucket of the first set on some side: upscaled later),
caption_over_77_tokens (exact with --tokenizer, else a lower-bound estimate), aspect_cropped,
converted_to_png, caption_kept_empty, multiple_captions.

Bucket sets: the first of --bucket-sets is the primary set: --on-aspect judges aspect against
its range (x --aspect-tolerance) and small_image against its buckets. In the index, an image out
of a set's range gets -1 (skip mode) or that set's extreme bucket (crop mode). Single-size sets
(square_*) take every image: cropping everything to the square is what they are for.

Resumable: records are checked by --workers processes in chunks of --chunk-size, each chunk
staged atomically in DIR/.staging/; after an interruption, rerun the same command and only
unstaged chunks are read again. The final write streams the chunks in order (re-reading image
bytes from the source, which is checked against a CRC) and then removes DIR/.staging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax import workdir as workdir_lib
from sdxl_jax.data import buckets, sources
from sdxl_jax.data import staging as staging_lib
from sdxl_jax.data.batching import INDEX_FILE
from sdxl_jax.data.checks import (
    CLIP_MAX_TOKENS,
    COUNTED,
    DEFAULT_BUCKET_SETS,
    SKIP_REASONS,
    Options,
    token_counter,
)
from sdxl_jax.data.readers import IMAGE_EXTENSIONS, Source, SourceError
from sdxl_jax.data.sources import open_sources

DATASET_NAME = "sdxl_prepared"
REPORT_FILE = "prepare_report.json"
STAGING, BUILD = ".staging", ".build"
EXAMPLES_PER_REASON = 20


# ---------------------------------------------------------------------------------------------
# Final write: TFDS ArrayRecord shards + metadata, side index, report
# ---------------------------------------------------------------------------------------------


def dataset_features() -> Any:
    """The TFDS features of a prepared dataset."""
    import tensorflow_datasets as tfds

    text = tfds.features.Text()
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": text,
            "captions": tfds.features.Sequence(text),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            "key": text,
        }
    )


class _Shards:
    """ArrayRecord shards cut at planned record positions ``ends`` (TFDS's shard rule); the
    record at planned position p goes to the first shard whose end exceeds p."""

    def __init__(self, folder: Path, ends: list[int]):
        self.folder, self.ends = folder, ends
        self.lengths, self.num_bytes, self._open = [0] * len(ends), 0, None

    def path(self, s: int) -> Path:
        name = f"{DATASET_NAME}-train.array_record-{s:05d}-of-{len(self.ends):05d}"
        return self.folder / name

    def write(self, position: int, serialized: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        s = int(np.searchsorted(self.ends, position, side="right"))
        if self._open is None or self._open[0] != s:
            self.close()
            self._open = (s, ArrayRecordWriter(str(self.path(s)), "group_size:1"))
        self._open[1].write(serialized)
        self.lengths[s] += 1
        self.num_bytes += len(serialized)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def finish(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self.close()
        for s in range(len(self.ends)):  # a shard whose records all dropped out stays, empty
            if not self.path(s).exists():
                ArrayRecordWriter(str(self.path(s)), "group_size:1").close()


def _to_write(staging: Path, n_chunks: int) -> tuple[set[int], list[int]]:
    """Records to write (kept, first of each key) and the shard ends over them."""
    from tensorflow_datasets.core.utils import shard_utils

    seen, planned, total_bytes = set(), set(), 0
    for c in range(n_chunks):
        for e in staging_lib.read_chunk(staging, c):
            if "skip" not in e and e["key"] not in seen:
                seen.add(e["key"])
                planned.add(e["i"])
                total_bytes += len(e["png"]) if e["png"] else e["size"]
    if not planned:
        return planned, [0]  # an empty dataset still has one (empty) shard
    shards = shard_utils.ShardConfig().get_number_shards(total_bytes, len(planned))
    return planned, shard_utils.get_shard_boundaries(len(planned), max(1, shards))


def _reload(source: Source, entry: dict[str, Any]) -> bytes | None:
    """The record's bytes as checked, or None if the source changed since."""
    try:
        data = source.load(entry["i"]).data
    except Exception:  # noqa: BLE001
        return None
    if isinstance(data, bytes) and len(data) == entry["size"] and zlib.crc32(data) == entry["crc"]:
        return data
    return None


@dataclasses.dataclass
class _Tally:
    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, key: str, detail: str) -> None:
        self.counts[reason] += 1
        found = self.examples.setdefault(reason, [])
        if len(found) < EXAMPLES_PER_REASON:
            found.append({"key": key, "detail": detail})


def _write_records(
    build: Path,
    source: Source,
    staging: Path,
    n_chunks: int,
    count_tokens: Callable[[list[str]], list[int]],
    tally: _Tally,
    progress: bool,
) -> tuple[list[dict[str, Any]], _Shards]:
    """Stream the staged chunks, in order, into ArrayRecord shards under ``build``; returns the
    written entries (the side index rows) and the shards."""
    from tqdm import tqdm

    planned, ends = _to_write(staging, n_chunks)
    shards, features, written, position = _Shards(build, ends), dataset_features(), [], 0
    with tqdm(total=len(planned), unit="img", desc="write", disable=not progress) as bar:
        for c in range(n_chunks):
            entries = staging_lib.read_chunk(staging, c)
            kept = [e for e in entries if e["i"] in planned]
            tokens = count_tokens([e["caption"] for e in kept])
            over = {e["i"] for e, t in zip(kept, tokens, strict=True) if t > CLIP_MAX_TOKENS}
            for e in entries:
                if "skip" in e:
                    tally.skip(e["skip"], e["key"], e["detail"])
                    continue
                if e["i"] not in planned:
                    tally.skip("duplicate_key", e["key"], "an earlier record has this key")
                    continue
                position, data = position + 1, e["png"] or _reload(source, e)
                bar.update(1)
                if data is None:
                    tally.skip("changed_during_build", e["key"], "source bytes changed")
                    continue
                example = {k: e[k] for k in ("caption", "captions", "height", "width", "key")}
                shards.write(position - 1, features.serialize_example({"image": data, **example}))
                tally.counts.update(e["flags"] + ["format " + e["format"]])
                tally.counts["caption_over_77_tokens"] += e["i"] in over
                written.append(e)
    shards.finish()
    return written, shards


def _write_metadata(build: Path, lengths: list[int], num_bytes: int, source: Source) -> None:
    import tensorflow_datasets as tfds

    info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(
            name=DATASET_NAME,
            version=tfds.core.Version("1.0.0"),
            data_dir=str(build),
            module_name=__name__,
        ),
        description=f"Prepared by sdxl_jax.data.prepare from {source.spec}; see {REPORT_FILE}.",
        features=dataset_features(),
        disable_shuffling=True,  # record i is the i-th written: sdxl_index.npz row i
        metadata=tfds.core.MetadataDict(source=source.spec, index=INDEX_FILE),
    )
    info.set_file_format("array_record")
    template = tfds.core.ShardedFileTemplate(
        data_dir=build, dataset_name=DATASET_NAME, split="train", filetype_suffix="array_record"
    )
    split = tfds.core.SplitInfo(
        name="train", shard_lengths=lengths, num_bytes=num_bytes, filename_template=template
    )
    info.set_splits(tfds.core.SplitDict([split]))
    info.write_to_directory(build)


def _save_index(build: Path, written: list[dict[str, Any]], opts: Options) -> dict:
    """DIR/sdxl_index.npz: row i describes record i."""
    n = len(written)
    arrays = {
        "key": np.asarray([e["key"] for e in written], dtype=str).reshape(n),
        "height": np.asarray([e["height"] for e in written], np.int32).reshape(n),
        "width": np.asarray([e["width"] for e in written], np.int32).reshape(n),
        "source_index": np.asarray([e["i"] for e in written], np.int64).reshape(n),
        "repeats": np.asarray([e.get("repeats", 1) for e in written], np.int32).reshape(n),
        "loss_weight": np.float32([e.get("loss_weight", 1.0) for e in written]).reshape(n),
    }
    ids = np.asarray([e["buckets"] for e in written], np.int16).reshape(n, len(opts.bucket_sets))
    for j, name in enumerate(opts.bucket_sets):
        arrays["bucket_" + name] = ids[:, j]
    with open(build / INDEX_FILE, "wb") as f:
        np.savez(f, **arrays)
    return arrays


# ---------------------------------------------------------------------------------------------
# prepare()
# ---------------------------------------------------------------------------------------------


def _ours(name: str) -> bool:
    files = ("dataset_info.json", "features.json", "metadata.json", INDEX_FILE, REPORT_FILE)
    name = name.removesuffix(".tmp")
    return name in files or name in (STAGING, BUILD) or name.startswith(f"{DATASET_NAME}-")


def _clear(out: Path, *, staging: bool) -> None:
    for p in out.iterdir():
        if _ours(p.name) and (staging or p.name != STAGING):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _check_writable(out: Path) -> None:
    """``--out`` is a folder (or can become one) that this process can write in."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder (new or empty)")
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise FileExistsError(f"--out {out}: {probe} is a broken or looping symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise FileExistsError(f"--out {out}: {probe} is a file, not a folder")
    try:  # a file written is the real test (os.access says yes to root everywhere)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(
            f"--out {out}: cannot write in {probe} ({e.strerror}); choose a writable folder"
        ) from None


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool) -> Path:
    """Create or reuse DIR; returns DIR/.staging, refusing to mix runs with other settings."""
    staging = out / STAGING
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
        if foreign:
            raise FileExistsError(
                f"--out {out} holds files prepare did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): choose a new or empty folder"
            )
        if overwrite:
            _clear(out, staging=True)
        elif (out / REPORT_FILE).exists() and not staging.exists():
            raise FileExistsError(
                f"{out} already holds a prepared dataset: --overwrite rebuilds it"
            )
    if (staging / "plan.json").exists():
        old = json.loads((staging / "plan.json").read_text())
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise FileExistsError(
                f"{staging} was staged with other settings ({', '.join(diff)} differ): rerun "
                f"with the same settings to resume, or pass --overwrite to start over"
            )
    else:
        staging.mkdir(parents=True, exist_ok=True)
        _write_json(staging / "plan.json", settings)
    return staging


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def prepare(
    source: str | Sequence[str],
    out: str | Path,
    *,
    bucket_sets: Sequence[str] = DEFAULT_BUCKET_SETS,
    workers: int | None = None,
    on_aspect: str = "skip",
    aspect_tolerance: float = 1.0,
    on_empty_caption: str = "skip",
    min_side: int = 0,
    verify: str = "decode",
    tokenizer: str | Path | None = None,
    max_examples: int | None = None,
    chunk_size: int = 256,
    keep_staging: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the dataset at ``out`` from ``source`` (KIND:LOCATION, or a list: one dataset of
    their records in turn); returns the report.

    See the module docstring for what is stored and which records are skipped.
    """
    t0 = time.perf_counter()
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples {max_examples}: give at least 1 (or leave it out)")
    if not workdir_lib.is_remote(out):
        _check_writable(Path(out))
    opts = Options(
        tuple(bucket_sets), on_aspect, aspect_tolerance, on_empty_caption, min_side, verify,
        chunk_size,
    )  # fmt: skip
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    src = open_sources(source)
    if len(src) == 0:
        raise SourceError(f"{src.spec} lists no records (image extensions: {IMAGE_EXTENSIONS})")
    n = len(src) if max_examples is None else min(len(src), max_examples)
    url = str(out) if workdir_lib.is_remote(out) else None
    if url is not None:  # a bucket: built on this disk, uploaded when complete
        if (workdir_lib.as_path(url) / REPORT_FILE).exists() and not overwrite:
            raise FileExistsError(
                f"{url} already holds a prepared dataset: --overwrite rebuilds it"
            )
    out = local_out(out)
    if url is not None and not overwrite and (out / REPORT_FILE).exists():
        if not (out / STAGING).exists():  # built here before; its upload did not finish
            print(f"{out} is built: uploading what is missing", flush=True)
            _upload(out, url, progress)
            return json.loads((out / REPORT_FILE).read_text())
    method, count_tokens = token_counter(tokenizer)  # fails early on a bad --tokenizer
    staging = _prepare_out(out, staging_lib.staging_settings(src, n, opts), overwrite)
    t_list = time.perf_counter()
    resumed = staging_lib.stage(src, n, staging, opts, workers, progress)
    t_check = time.perf_counter()

    _clear(out, staging=False)  # leftovers of an interrupted final write
    build, tally, n_chunks = out / BUILD, _Tally(), math.ceil(n / opts.chunk_size)
    build.mkdir()
    written, shards = _write_records(build, src, staging, n_chunks, count_tokens, tally, progress)
    _write_metadata(build, shards.lengths, shards.num_bytes, src)
    index = _save_index(build, written, opts)
    for p in sorted(build.iterdir()):
        os.replace(p, out / p.name)
    build.rmdir()
    t_write = time.perf_counter()

    report = _report(src, n, opts, method, tokenizer, tally, index)
    report["chunks"] = {"total": n_chunks, "staged_by_an_earlier_run": resumed}
    report["timings_s"] = {
        "list": round(t_list - t0, 3),
        "check": round(t_check - t_list, 3),
        "write": round(t_write - t_check, 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    _write_json(out / REPORT_FILE, report)  # written last: it marks a finished dataset
    if not keep_staging:
        shutil.rmtree(staging)
    if url is not None:
        _upload(out, url, progress)
    return report


def local_out(out: str | Path) -> Path:
    """Where the dataset is built: ``out``, or for a bucket URL its local mirror
    (``$SDXL_LOCAL_DIR/gs/...``, which also keeps the staged chunks of an interrupted run)."""
    return workdir_lib.local_mirror(str(out)) if workdir_lib.is_remote(out) else Path(out)


def _upload(out: Path, url: str, progress: bool) -> None:
    """Copy the finished dataset to the bucket, its report last (the report marks a finished
    dataset there too)."""
    remote, t = workdir_lib.as_path(url), time.perf_counter()
    if (remote / REPORT_FILE).exists():  # --overwrite: the finished dataset there goes first
        old = [p for p in remote.iterdir() if _ours(p.name)]
        for p in sorted(old, key=lambda p: p.name != REPORT_FILE):
            p.rmtree() if p.is_dir() else p.unlink()
    n = workdir_lib.publish(out, url, last=REPORT_FILE, skip=(STAGING,), progress=progress)
    print(f"uploaded {n} files to {url} in {time.perf_counter() - t:.0f} s", flush=True)


_TOKEN_NOTES = {
    "exact": "exact CLIP token counts of the stored caption (BOS and EOS included)",
    "estimated": "lower bound: CLIP pre-tokenizer pieces + BOS + EOS (BPE may split a piece "
    "further); pass --tokenizer DIR for exact counts",
}


def _report(
    src: Source,
    n: int,
    opts: Options,
    method: str,
    tokenizer: str | Path | None,
    tally: _Tally,
    index: dict[str, np.ndarray],
) -> dict[str, Any]:
    histograms = {}
    for name in opts.bucket_sets:
        ids, sizes = index["bucket_" + name], buckets.bucket_set(name).sizes
        histograms[name] = {
            "sizes": [list(s) for s in sizes],
            "counts": np.bincount(ids[ids >= 0], minlength=len(sizes)).tolist(),
            "out_of_range": int((ids < 0).sum()),
        }
    skipped = {r: tally.counts[r] for r in SKIP_REASONS}
    formats = {k[7:]: v for k, v in tally.counts.items() if k.startswith("format ")}
    return {
        "source": src.spec,
        "source_options": src.options,
        "source_records": len(src),
        "totals": {"read": n, "written": len(index["key"]), "skipped": sum(skipped.values())},
        "skipped": skipped,
        "counted": {c: tally.counts[c] for c in COUNTED},
        "skipped_examples": tally.examples,
        "caption_tokens": {
            "method": method,
            "tokenizer": None if tokenizer is None else str(tokenizer),
            "note": _TOKEN_NOTES[method],
        },
        "image_formats": dict(sorted(formats.items())),
        "bucket_sets": list(opts.bucket_sets),
        "bucket_histograms": histograms,
        "options": dataclasses.asdict(opts),
    }


def format_summary(report: dict[str, Any], out: str | Path) -> str:
    """The printed table: totals, skips by reason, counted conditions."""
    t, seconds = report["totals"], report["timings_s"]["total"]
    lines = [f"prepared {t['written']} of {t['read']} records into {out} ({seconds:.1f} s)"]
    lines.append(f"  {'skipped':<26}{'records':>9}")
    lines += [f"  {r:<26}{c:>9}" for r, c in report["skipped"].items() if c]
    lines.append(f"  {'(all skips)':<26}{t['skipped']:>9}")
    lines.append("  counted (kept records)")
    for name, c in report["counted"].items():
        note = f"  ({report['caption_tokens']['method']})" if name.startswith("caption") else ""
        lines.append(f"  {name:<26}{c:>9}{note if 'tokens' in name else ''}")
    primary = report["bucket_sets"][0]
    used = sum(1 for c in report["bucket_histograms"][primary]["counts"] if c)
    report_path = f"{str(out).rstrip('/')}/{REPORT_FILE}"  # a folder or a gs:// URL
    lines.append(f"  {used} buckets of {primary} in use; details: {report_path}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

PROG = "python -m sdxl_jax.data.prepare"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[1],
        epilog="sources in detail:\n" + sources.__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    # fmt: off
    a("--source", required=True, action="append", metavar="KIND:LOCATION",
      help="what to read (see above); repeat it for several sources in one dataset (a "
      "concept folder and its regularisation folder)")
    a("--out", required=True, metavar="DIR",
      help="the dataset folder to write (new or empty); gs://BUCKET/PATH builds in "
      "$SDXL_LOCAL_DIR and uploads the finished dataset")
    a("--bucket-sets", default=",".join(DEFAULT_BUCKET_SETS), metavar="A,B,...",
      help="bucket sets to index, the primary first (default: all: %(default)s)")
    a("--workers", type=int, default=None, help="checking processes (default: cores, at most 8)")
    a("--on-aspect", choices=("skip", "crop"), default="skip",
      help="an aspect beyond the primary set's range: skip the record, or keep it to be cropped "
      "to the extreme bucket (default: skip)")
    a("--aspect-tolerance", type=float, default=1.0,
      help="widen the aspect range by this factor (>= 1; default 1: the set's own range)")
    a("--on-empty-caption", choices=("skip", "keep"), default="skip",
      help="a missing or blank caption: skip the record, or keep it with caption '' "
      "(default: skip)")
    a("--min-side", type=int, default=0, help="skip images whose shorter side is below this (px)")
    a("--verify", choices=("decode", "probe"), default="decode",
      help="decode every image (finds truncated files; default) or read headers only (faster)")
    a("--tokenizer", metavar="DIR", help="a CLIP tokenizer folder: exact caption token counts")
    a("--max-examples", type=int, default=None, metavar="N",
      help="read only the first N records of the source (a trial run)")
    a("--chunk-size", type=int, default=256, help="records per staged chunk (default 256)")
    a("--keep-staging", action="store_true", help="keep DIR/.staging after the build")
    a("--overwrite", action="store_true",
      help="rebuild DIR, discarding an earlier dataset or staged chunks there")
    a("--no-progress", action="store_true", help="no progress bars")
    # fmt: on
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("source", "out", "no_progress")}
    kwargs["bucket_sets"] = [s for s in args.bucket_sets.split(",") if s]
    try:
        report = prepare(args.source, args.out, progress=not args.no_progress, **kwargs)
    except (SourceError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        staging = local_out(args.out) / STAGING
        resume = "rerun the same command to resume"
        print(f"\n{PROG}: interrupted; checked chunks stay in {staging}: {resume}", file=sys.stderr)
        return 130
    print(format_summary(report, args.out))
    if report["totals"]["written"] == 0:
        print(f"{PROG}: error: no record passed the checks (skip reasons above): the dataset "
              f"in {args.out} is empty; fix the source and rerun with --overwrite",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
