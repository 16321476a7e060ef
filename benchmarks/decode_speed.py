"""Host-side image throughput: JPEG decode + bucket assignment + resize-to-cover + crop.

Writes N JPEGs (1-2 MP, varied aspect ratios, photo-like texture) to a temp dir once, then
measures images per second of the per-example work the data pipeline does for the ~1024^2 SDXL
buckets (read file, ``decode_rgb``, ``nearest``, ``plan_crop``, ``apply_crop``), in worker
processes (multiprocessing Pool, the crop returned to the parent as Grain workers would) and in
threads (PIL releases the GIL while decoding and resizing).

    python benchmarks/decode_speed.py                      # 64 images, 1/2/4 workers
    python benchmarks/decode_speed.py --images 128 --workers 1,2,4,8 --passes 3
    python benchmarks/decode_speed.py --no-transfer         # + processes returning no pixels
    python benchmarks/decode_speed.py --bucket-set sdxl_256 --draft   # stage-1 size, DCT scaling

Not a test. The numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_jax.data import buckets, images  # noqa: E402


def make_corpus(out: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs (quality 90) of 1-2 MP with aspect h/w in [1/2.5, 2.5]: smooth colour + grain."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        mp_ = rng.uniform(1.0, 2.0) * 1e6
        aspect = np.exp(rng.uniform(np.log(1 / 2.5), np.log(2.5)))  # h / w
        h, w = int(np.sqrt(mp_ * aspect)), int(np.sqrt(mp_ / aspect))
        coarse = rng.integers(0, 256, (12, 12, 3), np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
        img = np.clip(img + rng.normal(0, 12, (h, w, 1)), 0, 255).astype(np.uint8)
        p = out / f"{i:04d}.jpg"
        Image.fromarray(img).save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


Task = tuple[str, int, str, bool]  # (path, seed, bucket set, decode JPEG at reduced scale)


def process(task: Task) -> np.ndarray:
    """One example's host work: the uint8 [bh, bw, 3] crop.

    Like the pipeline, the crop is planned from the size recorded at prepare time (here probed),
    so a reduced-scale JPEG decode can be asked for the resized size alone.
    """
    path, seed, name, draft = task
    bset = buckets.bucket_set(name)
    data = Path(path).read_bytes()
    h, w = images.probe(data)
    b = bset.nearest(h, w)
    crop = buckets.plan_crop(
        (h, w), bset.sizes[b], bucket=b, rng=np.random.default_rng(seed), flip=seed % 2 == 1
    )
    img = images.decode_rgb(data, min_size=crop.resized_size if draft else None)
    return buckets.apply_crop(img, crop)


def process_no_transfer(task: Task) -> tuple[int, ...]:
    """The same work, returning only the shape: the cost without shipping the pixels back."""
    return process(task).shape


def stage_times(paths: list[Path], name: str, draft: bool) -> dict[str, float]:
    """Milliseconds per image for each stage, single process."""
    bset = buckets.bucket_set(name)
    t = dict.fromkeys(("read", "probe+plan", "decode", "crop"), 0.0)
    for i, p in enumerate(paths):
        t0 = time.perf_counter()
        data = p.read_bytes()
        t1 = time.perf_counter()
        h, w = images.probe(data)
        b = bset.nearest(h, w)
        crop = buckets.plan_crop((h, w), bset.sizes[b], rng=np.random.default_rng(i))
        t2 = time.perf_counter()
        img = images.decode_rgb(data, min_size=crop.resized_size if draft else None)
        t3 = time.perf_counter()
        buckets.apply_crop(img, crop)
        t4 = time.perf_counter()
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            t[k] += dt * 1e3 / len(paths)
    return t


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def rate(kind: str, workers: int, tasks: list[Task]) -> tuple[float, float]:
    """(images per second, CPU ms per image) over the tasks; pool warmed before the clock.

    CPU time counts the parent and the workers, so it is robust to other load on the machine
    where the wall-clock rate is not.
    """
    if kind.startswith("processes"):
        fn = process if kind == "processes" else process_no_transfer
        pool = mp.get_context("fork").Pool(workers)
        pool.map(fn, tasks[:workers])  # warm: imports done, first file cached
        c0, t0 = cpu_seconds(), time.perf_counter()
        n = sum(1 for _ in pool.imap_unordered(fn, tasks, chunksize=2))
        dt = time.perf_counter() - t0
        pool.close()
        pool.join()  # reaps the workers, so their CPU time is counted
        cpu = cpu_seconds() - c0  # includes the warm-up's few images: a slight overcount
    else:
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(process, tasks[:workers]))
            c0, t0 = cpu_seconds(), time.perf_counter()
            n = sum(1 for _ in ex.map(process, tasks))
            dt = time.perf_counter() - t0
            cpu = cpu_seconds() - c0
    return n / dt, cpu * 1e3 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2, help="passes over the images per timing")
    ap.add_argument("--repeats", type=int, default=2, help="timings per setting; the best kept")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--threads", default="2,4", help="thread counts to try ('' for none)")
    ap.add_argument("--bucket-set", default="sdxl_1024")
    ap.add_argument(
        "--draft", action="store_true", help="decode JPEGs at reduced scale (decode_rgb min_size)"
    )
    ap.add_argument(
        "--no-transfer", action="store_true", help="also time processes that return no pixels"
    )
    args = ap.parse_args()

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, Pillow {Image.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        paths = make_corpus(Path(d), args.images)
        sizes = [Image.open(p).size for p in paths]
        mpix = np.mean([w * h for w, h in sizes]) / 1e6
        mbytes = np.mean([p.stat().st_size for p in paths]) / 1e6
        print(f"corpus: {len(paths)} JPEGs, mean {mpix:.2f} MP, {mbytes:.2f} MB each "
              f"(written in {time.perf_counter() - t0:.1f} s)")  # fmt: skip

        st = stage_times(paths, args.bucket_set, args.draft)
        print("\nsingle process, ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))

        tasks = [
            (str(p), i, args.bucket_set, args.draft)
            for _ in range(args.passes)
            for i, p in enumerate(paths)
        ]
        rows = [("processes", int(w)) for w in args.workers.split(",") if w]
        rows += [("threads", int(w)) for w in args.threads.split(",") if w]
        if args.no_transfer:
            rows += [("processes, no transfer", int(w)) for w in args.workers.split(",") if w]
        print(f"\nbucket set {args.bucket_set}, reduced-scale JPEG decode: {args.draft}; "
              f"best of {args.repeats}; load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
        print(f"{'mode':<24} {'workers':>7} {'images/s':>9} {'MP/s':>7} {'speedup':>8} "
              f"{'CPU ms/image':>13}")  # fmt: skip
        base = None
        for kind, w in rows:
            r, cpu = max(rate(kind, w, tasks) for _ in range(args.repeats))
            base = base or r
            print(f"{kind:<24} {w:>7} {r:>9.1f} {r * mpix:>7.1f} {r / base:>7.2f}x {cpu:>13.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
