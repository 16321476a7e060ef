"""benchmarks/device_checks.sh --smoke: the GPU script's every part run on the CPU with tiny
models (so it cannot rot between GPU runs), and its report on partial results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow(seconds=240)
def test_smoke_runs_every_part_and_reports_them(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on one GPU
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "device_checks.sh"), "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "exit " not in out.stdout, out.stdout[-4000:]  # no part failed or timed out
    # Our step: the full step and a LoRA step under a remat policy, each trained for real.
    ours = json.loads((tmp_path / "train_step.json").read_text())["results"]
    assert {(r["lora"], r["remat"]) for r in ours} == {(0, "attention_saveable"),
                                                       (4, "attention_saveable")}  # fmt: skip
    for r in ours:
        assert r["status"] == "ok", r
        assert math.isfinite(r["loss"]) and r["skipped_updates"] == 0
        assert r["step_ms_median"] > 0 and r["memory_analysis"]["planned"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["step_ms_median"])
    lora, full = sorted(ours, key=lambda r: r["lora"], reverse=True)
    assert lora["trained_params"] < full["trained_params"] / 5  # only the adapters train
    torch_rows = json.loads((tmp_path / "torch_step.json").read_text())["results"]
    assert [r["status"] for r in torch_rows] == ["ok"] and math.isfinite(torch_rows[0]["loss"])
    sampled = json.loads((tmp_path / "sample_mlperf_b2.json").read_text())["results"]
    assert sorted(r["impl"] for r in sampled if "error" not in r) == ["diffusers", "ours"]
    # The table: every row the parts wrote, nothing missing, printed last.
    report = json.loads((tmp_path / "device_checks.json").read_text())
    assert report["missing"] == ["extra_refiner", "extra_lora"]  # not run by --smoke
    assert len(report["train_step"]) == 3 and len(report["sampling"]) == 2
    assert out.stdout.rstrip().endswith((tmp_path / "device_checks.md").read_text().rstrip())


def test_report_lists_what_is_missing(tmp_path):
    (tmp_path / "torch_step.json").write_text(json.dumps({"results": [
        {"preset": "sdxl", "resolution": 1024, "batch": 4, "checkpointing": "on",
         "attention": "sdpa", "status": "oom"}]}))  # fmt: skip
    (tmp_path / "sample_x.json").write_text("{not json")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_checks_report.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "| PyTorch (diffusers) | sdxl 1024px | 4 | ckpt on, sdpa | oom |" in out.stdout
    assert "Not measured (no result file): train_step, extra_refiner, extra_lora, sample_x" in (
        out.stdout
    )
