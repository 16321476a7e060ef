"""The data layer sits at the bottom: nothing in sdxl_jax/data imports the layers above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "sdxl_jax" / "data"
ABOVE = ("conditioning", "models", "weights", "diffusion", "inference", "train")


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":`` (an entry-point shim may import the command it runs)."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and [getattr(c, "value", None) for c in node.test.comparators] == ["__main__"]
    )


def _imports(node: ast.AST) -> list[str]:
    """Every module imported under ``node`` (in functions too), outside ``__main__`` guards."""
    found = []
    for child in ast.iter_child_nodes(node):
        if _is_main_guard(child):
            continue
        if isinstance(child, ast.Import):
            found += [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom) and child.module:
            found += [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
        found += _imports(child)
    return found


def test_data_imports_no_layer_above_it():
    bad = {}
    for path in sorted(DATA.glob("*.py")):
        names = _imports(ast.parse(path.read_text()))
        above = sorted({n for n in names for a in ABOVE if n.startswith(f"sdxl_jax.{a}")})
        if above:
            bad[path.name] = above
    assert bad == {}


def test_the_cache_reader_does_not_import_the_pipeline_and_its_cli_still_runs():
    names = _imports(ast.parse((DATA / "cache.py").read_text()))
    assert not [n for n in names if n.startswith("sdxl_jax.data.pipeline")]
    cmd = [sys.executable, "-m", "sdxl_jax.data.cache", "--help"]
    out = subprocess.run(cmd, cwd=DATA.parents[1], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: python -m sdxl_jax.data.cache")
    assert "--bucket-set" in out.stdout and "cache_meta.json" in out.stdout
