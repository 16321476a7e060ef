"""The tiny train step on this CPU: one XLA device against two (the batch split over the data
axis), side by side, through the real trainer.

    python benchmarks/tiny_step_devices.py --workdir /tmp/speed [--steps 100] [--repeats 2]

Prepares once in --workdir the tiny frozen encoders and a 30-step autoencoder, then runs the
tiny base stage (``experiments/base_256.py:tiny`` on --bucket-set, cached latents, batch 32)
for --steps steps per run, alternating the device counts (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``, one process each, a fresh stage folder each), so
that the machine's drift hits both alike. Reports per run the first step (compile) and the
median steps/s of the logged intervals after the first; then the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(workdir: Path, argv: list[str], devices: int | None, log: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, "-m", "sdxl_jax.train", f"--workdir={workdir}", *argv]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    return out.returncode, out.stdout + out.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True, help="scratch workdir (reused between calls)")
    p.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
    p.add_argument("--repeats", type=int, default=2, help="runs per device count (default 2)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="device counts (1 2)")
    p.add_argument("--bucket-set", default="tiny_square_64", help="tiny_square_64 (16x16 latents)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ae = ["--config=experiments/autoencoder.py:tiny", "--config.optim.total_steps=30",
          "--config.optim.warmup_steps=5"]  # fmt: skip
    rc, text = run(workdir, ae, None, logs / "autoencoder.log")
    if rc:
        print(f"error: the autoencoder stage failed:\n{text[-2000:]}", file=sys.stderr)
        return 1
    rows = []
    for r in range(args.repeats):
        for n in args.devices:
            stage = f"speed_{n}dev_{r}_{int(time.time())}"
            cfg = ["--config=experiments/base_256.py:tiny", f"--config.stage={stage}",
                   f"--config.data.bucket_set={args.bucket_set}",
                   f"--config.optim.total_steps={args.steps}", "--config.log.every_steps=10",
                   "--config.checkpoint.every_steps=100000",
                   "--config.log.sample_every_steps=0", "--compile_cache="]  # fmt: skip
            t = time.perf_counter()
            rc, text = run(workdir, cfg, n, logs / f"{stage}.log")
            wall = time.perf_counter() - t
            if rc:
                print(f"error: {stage} failed:\n{text[-2000:]}", file=sys.stderr)
                return 1
            compile_s = float(re.search(r"first step \(compile\) ([\d.]+) s", text).group(1))
            metrics = [json.loads(x) for x in (workdir / stage / "metrics.jsonl").open()]
            rates = [m["perf/steps_per_s"] for m in metrics if "perf/steps_per_s" in m][1:]
            rows.append(dict(devices=n, run=r, compile_s=compile_s, wall_s=round(wall, 1),
                             steps_per_s=statistics.median(rates)))  # fmt: skip
            print(f"{n} device(s), run {r}: first step {compile_s:.1f} s, "
                  f"{rows[-1]['steps_per_s']:.2f} steps/s (median of {len(rates)} intervals), "
                  f"wall {wall:.0f} s", flush=True)  # fmt: skip
    med = {n: statistics.median(x["steps_per_s"] for x in rows if x["devices"] == n)
           for n in args.devices}  # fmt: skip
    for n in args.devices[1:]:
        base = args.devices[0]
        print(f"{n} devices vs {base}: {med[n]:.2f} vs {med[base]:.2f} steps/s, "
              f"ratio {med[n] / med[base]:.2f}x")  # fmt: skip
    (workdir / "tiny_step_devices.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
