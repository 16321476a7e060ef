"""The table of a ``benchmarks/device_checks.sh`` run: reads the JSON files it wrote under OUT
(train_step.json, torch_step.json, extra_*.json, sample_*.json), writes OUT/device_checks.md
and OUT/device_checks.json (the rows, with the versions and the device) and prints the table.

    python benchmarks/device_checks_report.py OUT

A part that did not run (or whose file is missing or unreadable) is listed as missing, not an
error: the table shows what was measured.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

GIB = 2**30


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(x: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, fmt)


def ours_rows(data: dict[str, Any]) -> list[list[str]]:
    """Our train step: one row per configuration of train_step_speed.py."""
    rows = []
    for r in data.get("results", []):
        planned = (r.get("memory_analysis") or {}).get("planned")
        what = f"{r.get('preset')} {r.get('size')}px"
        what += f" LoRA r{r['lora']}" if r.get("lora") else ""
        how = f"remat {r.get('remat')}, attn {r.get('attention')}"
        how += ", fit" if r.get("fit") else ""
        rows.append([
            "ours (JAX)", what, str(r.get("batch")), how, r.get("status", "?"),
            _f(r.get("compile_s"), ".1f"), _f(r.get("step_ms_median"), ".1f"),
            _f(r.get("images_per_s"), ".2f"), _f(r.get("mfu_peak"), ".1f", 100),
            _f(r.get("mfu_matmul"), ".1f", 100), _f(r.get("peak_bytes"), ".1f", 1 / GIB),
            _f(planned, ".1f", 1 / GIB),
        ])  # fmt: skip
    return rows


def torch_rows(data: dict[str, Any]) -> list[list[str]]:
    """The same step in PyTorch (diffusers' UNet): torch_train_step_speed.py's rows."""
    rows = []
    for r in data.get("results", []):
        how = f"ckpt {r.get('checkpointing')}, {r.get('attention')}"
        how += ", torch.compile" if r.get("compile") else ""
        rows.append([
            "PyTorch (diffusers)", f"{r.get('preset')} {r.get('resolution')}px",
            str(r.get("batch")),
            how, r.get("status", "?"), _f(r.get("first_step_s"), ".1f"),
            _f(r.get("step_ms_median"), ".1f"), _f(r.get("images_per_s"), ".2f"),
            _f(r.get("mfu"), ".1f", 100), "-", _f(r.get("peak_allocated_bytes"), ".1f", 1 / GIB),
            "-",
        ])  # fmt: skip
    return rows


def sample_rows(name: str, data: dict[str, Any]) -> list[list[str]]:
    """sample_speed.py: seconds per batch (median of the timed calls) and images/s."""
    s = data.get("settings", {})
    what = (
        f"{s.get('preset')} {s.get('height')}x{s.get('width')}, {s.get('sampler')} "
        f"{s.get('steps')} steps, cfg {s.get('guidance')}"
    )
    rows = []
    for r in data.get("results", []):
        if "error" in r:
            rows.append(
                [name, r.get("impl", "?"), what, str(s.get("batch")), "error", "-", "-", "-"]
            )
            continue
        med = statistics.median(r["runs_s"])
        rows.append([
            name, r["impl"], what, str(s.get("batch")), "ok", _f(r.get("first_call_s"), ".1f"),
            f"{med:.3f}", f"{s.get('batch', 1) / med:.2f}",
        ])  # fmt: skip
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    step_rows, samples, missing, meta = [], [], [], {}
    for name in ("train_step", "torch_step", "extra_refiner", "extra_lora"):
        data = _load(out / f"{name}.json")
        if data is None:
            missing.append(name)
            continue
        meta[name] = {
            k: data.get(k) for k in ("device", "jax", "torch", "diffusers", "matmul_tflops")
        }
        step_rows += torch_rows(data) if name == "torch_step" else ours_rows(data)
    for path in sorted(out.glob("sample_*.json")):
        data = _load(path)
        if data is None:
            missing.append(path.stem)
            continue
        samples += sample_rows(path.stem, data)
    versions = (out / "versions.txt").read_text().strip() if (out / "versions.txt").exists() else ""
    parts = [f"Software: {versions}" if versions else "", "### Train step"]
    parts.append(table(["impl", "model", "batch", "settings", "status", "compile / first s",
                        "median ms", "img/s", "MFU % peak", "MFU % matmul", "peak GiB",
                        "XLA plan GiB"], step_rows))  # fmt: skip
    parts += ["### Sampling", table(["run", "impl", "settings", "batch", "status", "first s",
                                     "s / batch", "img/s"], samples)]  # fmt: skip
    if missing:
        parts.append("Not measured (no result file): " + ", ".join(missing))
    text = "\n\n".join(p for p in parts if p)
    (out / "device_checks.md").write_text(text + "\n")
    (out / "device_checks.json").write_text(json.dumps(
        {"meta": meta, "versions": versions, "train_step": step_rows, "sampling": samples,
         "missing": missing}, indent=2))  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
