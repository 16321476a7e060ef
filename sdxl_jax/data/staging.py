"""Prepare's first phase: check records in parallel into chunks staged in ``DIR/.staging/``.

Records ``[0, n)`` are cut into chunks of ``Options.chunk_size``; ``--workers`` spawned
processes check them (``checks.check_record``) and each finished chunk is written atomically, so
an interrupted run resumes with only the unstaged chunks. ``staging_settings`` is what the
chunks depend on: a resumed run with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from sdxl_jax.data.checks import Options, check_record
from sdxl_jax.data.readers import Source

_WORKER: tuple[Source, Options] | None = None


def _init_worker(source: Source, opts: Options) -> None:
    global _WORKER
    _WORKER = (source, opts)


def _check_chunk(bounds: tuple[int, int]) -> list[dict[str, Any]]:
    source, opts = _WORKER
    return [check_record(source, i, opts) for i in range(*bounds)]


def chunk_path(staging: Path, c: int) -> Path:
    return staging / f"chunk_{c:07d}.pkl"


def write_chunk(staging: Path, c: int, entries: list[dict[str, Any]]) -> None:
    tmp = staging / f".chunk_{c:07d}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(entries, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, chunk_path(staging, c))


def read_chunk(staging: Path, c: int) -> list[dict[str, Any]]:
    with open(chunk_path(staging, c), "rb") as f:
        return pickle.load(f)


def _checked_chunks(
    source: Source, opts: Options, todo: list[tuple[int, tuple[int, int]]], workers: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(chunk, entries) as chunks finish (any order), on ``workers`` spawned processes."""
    if workers <= 1:
        _init_worker(source, opts)
        for c, bounds in todo:
            yield c, _check_chunk(bounds)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding TFDS/JAX threads
    pool = ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=(source, opts))
    queue, running = iter(todo), {}
    try:
        while True:
            while len(running) < 2 * workers and (job := next(queue, None)) is not None:
                running[pool.submit(_check_chunk, job[1])] = job[0]
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=running.get):
                yield running.pop(future), future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stage(
    source: Source, n: int, staging: Path, opts: Options, workers: int, progress: bool
) -> int:
    """Check records [0, n) into staged chunks; returns how many chunks an earlier run had."""
    from tqdm import tqdm

    starts = range(0, n, opts.chunk_size)
    chunks = [(c, (s, min(n, s + opts.chunk_size))) for c, s in enumerate(starts)]
    todo = [job for job in chunks if not chunk_path(staging, job[0]).exists()]
    done = sum(b - a for c, (a, b) in chunks if chunk_path(staging, c).exists())
    with tqdm(total=n, initial=done, unit="img", desc="check", disable=not progress) as bar:
        for c, entries in _checked_chunks(source, opts, todo, min(workers, len(todo))):
            write_chunk(staging, c, entries)
            bar.update(len(entries))
    return len(chunks) - len(todo)


def staging_settings(source: Source, n: int, opts: Options) -> dict[str, Any]:
    """What the staged chunks depend on, as JSON values (compared on resume)."""
    settings = {
        "format": "sdxl_jax.data.prepare/1",
        "source": source.spec,
        "options": source.options,
        "records": n,
        "listing": source.fingerprint(),
        "check": dataclasses.asdict(opts),
    }
    return json.loads(json.dumps(settings))
