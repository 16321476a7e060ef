"""Peak host memory and time of loading a full-size SDXL base UNet from diffusers safetensors.

Writes a random-valued checkpoint of the real size (2,567,463,684 parameters) in diffusers layout,
one tensor at a time, then loads it with ``load_component`` in a fresh subprocess, so that the
subprocess's memory is the load's alone, and reports peak resident memory against the file size.

    python benchmarks/load_memory.py                        # bf16 file -> bf16 params (5.1 GB)
    python benchmarks/load_memory.py --dtype fp32           # fp32 file -> fp32 params (10.3 GB)
    python benchmarks/load_memory.py --dtype bf16 --param-dtype fp32

Not a test: it writes gigabytes and takes minutes. The numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
}
GB = 1e9
STEM = "diffusion_pytorch_model"


# -- memory probes ---------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class RssSampler(threading.Thread):
    """Polls VmRSS every ``interval_s`` and keeps the maximum (a check on VmHWM)."""

    def __init__(self, interval_s: float = 0.02):
        super().__init__(daemon=True)
        self.interval_s, self.peak, self._done = interval_s, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, proc_status()["VmRSS"])
            self._done.wait(self.interval_s)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, proc_status()["VmRSS"])
        return self.peak


# -- step 1: write the checkpoint --------------------------------------------------------------
def checkpoint_files(unet_dir: Path) -> list[Path]:
    return sorted(unet_dir.glob(f"{STEM}*.safetensors"))


def write_checkpoint(workdir: Path, dtype: np.dtype, max_shard_bytes: int | None) -> int:
    """Random SDXL base UNet in diffusers layout; returns the bytes written. Holds one tensor."""
    import jax.numpy as jnp

    from sdxl_jax.models.unet import UNetConfig
    from sdxl_jax.weights.components import COMPONENTS
    from sdxl_jax.weights.mapping import param_entries
    from sdxl_jax.weights.safetensors_io import TensorSpec, write_sharded

    cfg = UNetConfig.sdxl_base()
    comp = COMPONENTS["unet"]
    abstract = comp.abstract(cfg, param_dtype=jnp.float32)  # shapes only
    entries = param_entries(abstract, comp.rules)
    n_params = sum(int(np.prod(e.shape, dtype=np.int64)) for e in entries)
    total = n_params * dtype.itemsize
    print(f"writing {n_params:,} params as {dtype.name}: {total / GB:.2f} GB", flush=True)

    done = {"bytes": 0, "next": 0.5 * GB}
    t0 = time.perf_counter()

    def produce(key: str, shape: tuple[int, ...]) -> np.ndarray:
        # Seeded by the key (crc32: stable across runs, unlike hash()), generated only now.
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= 0.02
        a = a.astype(dtype, copy=False)
        done["bytes"] += a.nbytes
        if done["bytes"] >= done["next"] or done["bytes"] == total:
            dt = time.perf_counter() - t0
            rate = done["bytes"] / dt / GB if dt else 0.0
            eta = (total - done["bytes"]) / GB / rate if rate else 0.0
            print(
                f"  {done['bytes'] / GB:6.2f} / {total / GB:.2f} GB  {rate:.2f} GB/s  "
                f"ETA {eta:4.0f} s",
                flush=True,
            )
            done["next"] += 0.5 * GB
        return a

    specs = {}
    for e in entries:
        for k in e.keys:
            specs[k] = TensorSpec(e.ref_shape, dtype, lambda k=k, s=e.ref_shape: produce(k, s))
    unet_dir = workdir / "unet"
    unet_dir.mkdir(parents=True, exist_ok=True)
    (unet_dir / "config.json").write_text(
        json.dumps(comp.to_reference(cfg), indent=2, sort_keys=True)
    )
    names = write_sharded(unet_dir, STEM, specs, max_shard_bytes, metadata={"format": "pt"})
    size = sum(p.stat().st_size for p in checkpoint_files(unet_dir))
    dt = time.perf_counter() - t0
    print(
        f"wrote {len(names)} file(s), {len(specs)} tensors, {size:,} bytes ({size / GB:.2f} GB) "
        f"in {dt:.0f} s to {unet_dir}",
        flush=True,
    )
    return size


def drop_page_cache(files: list[Path]) -> None:
    """Evict these files (only) from the page cache, so the load reads from disk."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- step 2: load in a fresh process ---------------------------------------------------------
def measure_export(workdir: Path, unet, param_dtype: str) -> dict:
    """Export the loaded UNet as a diffusers folder, reload it and compare every parameter."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdxl_jax.weights.diffusers_io import load_component, save_component

    out = workdir / "export"
    before = proc_status()["VmRSS"]
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    save_component(unet, out, "unet", max_shard_bytes=int(5 * GB))
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    t0 = time.perf_counter()
    again = load_component(out, "unet", param_dtype=DTYPES[param_dtype], dtype=jnp.float32)
    reload_seconds = time.perf_counter() - t0
    a = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    exact = a.keys() == b.keys() and all(
        bool(jax.numpy.array_equal(a[k].get_value(), b[k].get_value())) for k in a
    )
    shutil.rmtree(out, ignore_errors=True)
    return {
        "export_seconds": seconds,
        "export_extra_rss": peak - before,
        "reload_seconds": reload_seconds,
        "bit_exact": exact,
    }


def measure_load(workdir: Path, param_dtype: str, export: bool = False) -> dict:
    """Runs in the subprocess: baseline, then ``load_component`` with RSS sampled throughout."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdxl_jax.weights.components import COMPONENTS
    from sdxl_jax.weights.diffusers_io import load_component, read_config

    # Baseline: everything but the load itself (jax/flax imported, the abstract module built).
    comp = COMPONENTS["unet"]
    abstract = comp.abstract(read_config(workdir, "unet"), param_dtype=DTYPES[param_dtype])
    del abstract
    jax.devices()  # initialise the backend
    base = proc_status()["VmRSS"]

    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    unet = load_component(workdir, "unet", param_dtype=DTYPES[param_dtype], dtype=jnp.float32)
    params = nnx.state(unet, nnx.Param)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    sampled = sampler.stop()
    leaves = jax.tree.leaves(params)
    result = {
        "param_count": sum(int(x.size) for x in leaves),
        "param_bytes": sum(int(x.nbytes) for x in leaves),
        "baseline_rss": base,
        "after_rss": proc_status()["VmRSS"],
        "vm_hwm": proc_status()["VmHWM"],
        "sampled_peak_rss": sampled,
        "ru_maxrss": ru_maxrss(),
        "seconds": seconds,
        "backend": jax.default_backend(),
    }
    if export:
        result.update(measure_export(workdir, unet, param_dtype))
    return result


def run_child(workdir: Path, param_dtype: str, export: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--measure-load", str(workdir), "--param-dtype", param_dtype]
    cmd += ["--export"] if export else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the load subprocess failed (exit {proc.returncode}; -9 = killed, OOM?)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------
def report(r: dict, file_bytes: int, args: argparse.Namespace) -> str:
    peak = r["vm_hwm"]
    load_only = peak - r["baseline_rss"]
    rows = [
        ("file size", f"{file_bytes / GB:.3f} GB ({file_bytes:,} B)"),
        (
            "parameters",
            f"{r['param_count']:,} as {args.param_dtype}: {r['param_bytes'] / GB:.3f} GB",
        ),
        ("baseline RSS (jax + abstract UNet)", f"{r['baseline_rss'] / GB:.3f} GB"),
        ("peak RSS (VmHWM)", f"{peak / GB:.3f} GB"),
        ("peak RSS (sampled VmRSS, 20 ms)", f"{r['sampled_peak_rss'] / GB:.3f} GB"),
        ("peak RSS (ru_maxrss)", f"{r['ru_maxrss'] / GB:.3f} GB"),
        ("RSS after load", f"{r['after_rss'] / GB:.3f} GB"),
        ("peak RSS / file size", f"{peak / file_bytes:.3f}"),
        ("(peak - baseline) / parameter bytes", f"{load_only / r['param_bytes']:.3f}"),
        ("load time (load_component + block)", f"{r['seconds']:.1f} s"),
        ("throughput", f"{file_bytes / r['seconds'] / GB:.2f} GB/s of file"),
    ]
    if "export_seconds" in r:
        rows += [
            ("export to diffusers (save_component)", f"{r['export_seconds']:.1f} s"),
            ("export: RSS above the loaded model", f"{r['export_extra_rss'] / GB:.3f} GB"),
            ("re-import of the export", f"{r['reload_seconds']:.1f} s"),
            ("import -> export -> import bit-exact", str(r["bit_exact"])),
        ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    cache = "cold" if args.cold else "warm"
    return (
        f"| {args.dtype} -> {args.param_dtype} | {file_bytes / GB:.2f} GB | "
        f"{r['param_bytes'] / GB:.2f} GB | {r['baseline_rss'] / GB:.2f} GB | {peak / GB:.2f} GB | "
        f"{peak / file_bytes:.2f}x | {load_only / r['param_bytes']:.2f}x | {r['seconds']:.0f} s | "
        f"{file_bytes / r['seconds'] / GB:.2f} GB/s | {cache} |"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Peak RSS is the load subprocess's VmHWM: its own high-water mark, which includes the "
            "baseline (python + jax + flax + the abstract module) reported separately. "
            "ru_maxrss is shown too but can inherit the parent's peak across fork/exec."
        ),
    )
    p.add_argument(
        "--workdir", type=Path, help="where to write the checkpoint (default: a temp dir)"
    )
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint afterwards")
    p.add_argument(
        "--reuse", action="store_true", help="load the checkpoint already in --workdir, write none"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="bf16", help="dtype in the file (default bf16)"
    )
    p.add_argument(
        "--param-dtype", choices=DTYPES, help="dtype of the loaded params (default: --dtype)"
    )
    p.add_argument(
        "--shard-gb", type=float, default=5.0, help="max shard size in GB, 0 = one file (default 5)"
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="evict the checkpoint from the page cache before loading",
    )
    p.add_argument(
        "--export",
        action="store_true",
        help="also export the loaded UNet to a diffusers folder, re-import it and check that "
        "every parameter is bit-identical (needs twice the parameter memory)",
    )
    p.add_argument("--measure-load", type=Path, help=argparse.SUPPRESS)  # the subprocess's entry
    args = p.parse_args(argv)
    args.param_dtype = args.param_dtype or args.dtype

    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.param_dtype, args.export)))
        return

    if args.reuse and not args.workdir:
        p.error("--reuse needs --workdir")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdxl_load_memory_"))
    unet_dir = workdir / "unet"
    n_params = 2_567_463_684
    file_bytes = n_params * DTYPES[args.dtype].itemsize
    param_bytes = n_params * DTYPES[args.param_dtype].itemsize
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if param_bytes > 0.9 * ram:
        p.error(f"{param_bytes / GB:.1f} GB of parameters will not fit {ram / GB:.1f} GB of RAM")
    if not args.reuse:
        workdir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(workdir).free
        if file_bytes > 0.95 * free:
            p.error(f"{file_bytes / GB:.1f} GB file, {free / GB:.1f} GB free at {workdir}")
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {ram / GB:.1f} GB RAM, python "
        f"{platform.python_version()}, numpy {np.__version__}",
        flush=True,
    )

    written = False
    try:
        if args.reuse:
            if not checkpoint_files(unet_dir):
                p.error(f"--reuse: no {STEM}*.safetensors in {unet_dir}")
            size = sum(f.stat().st_size for f in checkpoint_files(unet_dir))
        else:
            written = True
            shard = int(args.shard_gb * GB) or None
            size = write_checkpoint(workdir, DTYPES[args.dtype], shard)
        if args.cold:
            drop_page_cache(checkpoint_files(unet_dir))
        print(
            f"loading in a subprocess as {args.param_dtype} ({'cold' if args.cold else 'warm'} "
            f"page cache) ...",
            flush=True,
        )
        r = run_child(workdir, args.param_dtype, args.export)
        print(f"backend: {r['backend']}")
        line = report(r, size, args)
        print(
            "\nBENCHMARKS.md row (dtypes | file | params | baseline | peak RSS | peak/file | "
            "(peak-baseline)/params | time | throughput | page cache):"
        )
        print(line)
    finally:
        if written and not args.keep:
            shutil.rmtree(unet_dir, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        elif written:
            print(f"kept {unet_dir}")


if __name__ == "__main__":
    main()
