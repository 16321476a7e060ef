"""``python -m sdxl_jax.data.cache`` still runs now that its builder lives in train/ (the data
layer's imports are checked by tests/test_architecture.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cache_cli_runs_through_its_entry_point_shim():
    cmd = [sys.executable, "-m", "sdxl_jax.data.cache", "--help"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: python -m sdxl_jax.data.cache")
    assert "--bucket-set" in out.stdout and "cache_meta.json" in out.stdout
