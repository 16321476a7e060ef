"""The package's architecture, checked from its source (STYLE.md: "Layout shows the
architecture"): no import cycles, dependencies pointing the way data flows, no oversized files
or functions.

Every module under sdxl_jax/ is parsed with ``ast`` (nothing is imported). An import is any
``import`` / ``from ... import`` statement, at module level or inside a function (relative ones
resolved), and ``importlib.import_module("...")`` with a literal name; imports under
``if __name__ == "__main__":`` are entry-point shims and do not count. ``networkx`` (installed
with torch, from requirements-test.txt) finds the cycles.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sdxl_jax"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
# The modules that may import the top-level ``experiments`` package (the stage configs): the
# curriculum (its stages), the training entry point, and ``plan``, which resolves
# ``--config experiments/<stage>.py[:arg]``.
EXPERIMENTS_IMPORTERS = frozenset(
    {"sdxl_jax.train.curriculum", "sdxl_jax.train.__main__", "sdxl_jax.plan"}
)


@dataclasses.dataclass(frozen=True, order=True)
class Import:
    path: str  # "sdxl_jax/data/cache.py"
    line: int
    importer: str  # module name
    imported: str  # module name (a sdxl_jax module, or experiments[.x])

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Modules under ``importers`` must not import modules under ``forbidden``, except those
    under ``allowed``; modules in ``exempt`` may."""

    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str
    allowed: tuple[str, ...] = ()
    exempt: frozenset[str] = frozenset()


RULES = (
    Rule(
        ("sdxl_jax.models",),
        (
            "sdxl_jax.weights",
            "sdxl_jax.data",
            "sdxl_jax.diffusion",
            "sdxl_jax.train",
            "sdxl_jax.inference",
            "sdxl_jax.sample",
            "sdxl_jax.conditioning",
            "sdxl_jax.eval",
        ),
        "models/ are pure Flax modules and configs; checkpoint names live in weights/",
    ),
    Rule(
        ("sdxl_jax.diffusion",),
        ("sdxl_jax",),
        "diffusion/ is the math: schedule, samplers, denoiser; it imports only diffusion/",
        allowed=("sdxl_jax.diffusion",),
    ),
    Rule(
        ("sdxl_jax.data",),
        (
            "sdxl_jax.models",
            "sdxl_jax.weights",
            "sdxl_jax.diffusion",
            "sdxl_jax.inference",
            "sdxl_jax.train",
            "sdxl_jax.conditioning",
            "sdxl_jax.eval",
        ),
        "data/ comes first in the data flow: it imports no later stage",
    ),
    Rule(
        ("sdxl_jax.inference",),
        ("sdxl_jax.eval", "sdxl_jax.train", "sdxl_jax.sample"),
        "inference/ generates images; scoring them (eval/) and training build on it",
    ),
    Rule(
        ("sdxl_jax.eval",),
        ("sdxl_jax.train", "sdxl_jax.sample"),
        "eval/ scores images (from generate() or a folder); training and the sampling CLI "
        "call it, never the other way",
    ),
    Rule(
        ("sdxl_jax",),
        ("sdxl_jax.train.curriculum",),
        "the curriculum is a demo driver: only the training entry point runs it",
        exempt=frozenset({"sdxl_jax.train.__main__"}),
    ),
    Rule(
        tuple(
            f"sdxl_jax.{m}"
            for m in (
                "models",
                "weights",
                "data",
                "diffusion",
                "conditioning",
                "inference",
                "train",
                "eval",
                "sample",
                "convert",
                "plan",
                "checkpoint",
                "sharding",
                "distributed",
                "workdir",
            )
        ),
        ("sdxl_jax.compare",),
        "compare/ (the preference study) is an entry point over sample's output folders; "
        "nothing builds on it",
    ),  # fmt: skip
    Rule(
        ("sdxl_jax",),
        ("experiments",),
        "the library does not depend on the stage configs (allow-list: EXPERIMENTS_IMPORTERS)",
        exempt=EXPERIMENTS_IMPORTERS,
    ),
)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# --- the scan ---------------------------------------------------------------------------------


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package under ``root``."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_main_guard(node: ast.If) -> bool:
    t = node.test
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and len(t.comparators) == 1
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value == "__main__"
    )


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[tuple[str, int]] = []

    def _add(self, name: str, line: int) -> None:
        top = name.partition(".")[0]
        if top == "experiments":
            self.found.append((name, line))
        elif top == PACKAGE:
            while name not in self.known and "." in name:  # an attribute of a module
                name = name.rpartition(".")[0]
            self.found.append((name, line))

    def visit_If(self, node: ast.If) -> None:
        if _is_main_guard(node):  # an entry-point shim: only its else branch counts
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def scan(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """The package's modules and every import of a sdxl_jax module or of experiments."""
    modules = module_files(root)
    imports = []
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text("utf-8"), str(path)))
        rel = path.relative_to(root).as_posix()
        for imported, line in visitor.found:
            if imported != name:
                imports.append(Import(rel, line, name, imported))
    return modules, sorted(imports)


# --- the checks -------------------------------------------------------------------------------


def import_cycles(imports: list[Import]) -> list[str]:
    """One message per group of modules that import each other, with the imports that close
    the loop."""
    graph = nx.DiGraph()
    for imp in imports:
        if imp.imported.startswith(PACKAGE):
            graph.add_edge(imp.importer, imp.imported)
    out = []
    for scc in nx.strongly_connected_components(graph):
        if len(scc) < 2:
            continue
        edges = [f"    {i}" for i in imports if i.importer in scc and i.imported in scc]
        out.append(f"cycle between {', '.join(sorted(scc))}:\n" + "\n".join(edges))
    return sorted(out)


def layer_violations(imports: list[Import], rules: tuple[Rule, ...] = RULES) -> list[str]:
    return [
        f"{imp} ({rule.why})"
        for imp in imports
        for rule in rules
        if _under(imp.importer, rule.importers)
        and imp.importer not in rule.exempt
        and _under(imp.imported, rule.forbidden)
        and not _under(imp.imported, rule.allowed)
    ]


def size_violations(
    modules: dict[str, Path],
    root: Path,
    max_file: int = MAX_FILE_LINES,
    max_function: int = MAX_FUNCTION_LINES,
) -> list[str]:
    out = []
    for path in modules.values():
        text = path.read_text("utf-8")
        rel = path.relative_to(root).as_posix()
        if (n := len(text.splitlines())) > max_file:
            out.append(f"{rel}: {n} lines (> {max_file}: split it along a real seam)")
        for qualname, node in _functions(ast.parse(text)):
            if (n := node.end_lineno - node.lineno + 1) > max_function:
                out.append(
                    f"{rel}:{node.lineno}: function {qualname} is {n} lines (> {max_function})"
                )
    return out


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, methods and nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _report(title: str, problems: list[str]) -> str:
    return f"{len(problems)} {title}:\n" + "\n".join(problems)


# --- the package ------------------------------------------------------------------------------

MODULES, IMPORTS = scan(ROOT)


def test_the_scan_sees_the_package():
    """Guards the guard: an empty scan would pass every check below."""
    assert len(MODULES) > 40 and "sdxl_jax.train.__main__" in MODULES
    edges = {(i.importer, i.imported) for i in IMPORTS}
    assert ("sdxl_jax.diffusion.samplers", "sdxl_jax.diffusion.schedule") in edges


def test_no_import_cycles():
    cycles = import_cycles(IMPORTS)
    assert not cycles, _report("import cycles", cycles)


def test_dependencies_point_the_way_data_flows():
    violations = layer_violations(IMPORTS)
    assert not violations, _report("imports against the layering", violations)


def test_no_oversized_files_or_functions():
    oversized = size_violations(MODULES, ROOT)
    assert not oversized, _report("oversized files or functions", oversized)


# --- the checker on a synthetic package -------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_cycles_layering_and_sizes(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(85))  # 86-line functions
    method = body.replace("    ", "        ")
    _write(
        tmp_path,
        {
            "sdxl_jax/__init__.py": "",
            "sdxl_jax/models/unet.py": "from sdxl_jax.weights.mapping import rules\n",
            # A cycle through a function-level, relative import.
            "sdxl_jax/weights/__init__.py": "",
            "sdxl_jax/weights/mapping.py": "def rules():\n    from ..models import unet\n",
            # Allowed: within diffusion/; an entry-point shim; a module naming itself.
            "sdxl_jax/diffusion/__init__.py": "",
            "sdxl_jax/diffusion/samplers.py": (
                "from . import schedule\n"
                "import sdxl_jax.diffusion.samplers\n"
                "if __name__ == '__main__':\n"
                "    from sdxl_jax.train import loop\n"
            ),
            "sdxl_jax/diffusion/schedule.py": (
                "import importlib\n"
                "def f():\n"
                "    return importlib.import_module('sdxl_jax.train.curriculum')\n"
            ),
            "sdxl_jax/train/__init__.py": "",
            "sdxl_jax/train/curriculum.py": "from experiments import base_256\n",
            "sdxl_jax/train/__main__.py": "from sdxl_jax.train import curriculum\n",
            "sdxl_jax/train/loop.py": (
                "from experiments.common import get_config\n"
                "from sdxl_jax.train.curriculum import run\n"
                f"def _run():\n{body}class Loop:\n    def step(self):\n{method}"
            ),
            "sdxl_jax/data/pipeline.py": "from sdxl_jax.data.cache import x\n" + "\n" * 600,
            "sdxl_jax/data/cache.py": "def f():\n    import sdxl_jax.data.pipeline\n",
        },
    )
    modules, imports = scan(tmp_path)

    cycles = import_cycles(imports)
    assert cycles == [
        "cycle between sdxl_jax.data.cache, sdxl_jax.data.pipeline:\n"
        "    sdxl_jax/data/cache.py:2: sdxl_jax.data.cache imports sdxl_jax.data.pipeline\n"
        "    sdxl_jax/data/pipeline.py:1: sdxl_jax.data.pipeline imports sdxl_jax.data.cache",
        "cycle between sdxl_jax.models.unet, sdxl_jax.weights.mapping:\n"
        "    sdxl_jax/models/unet.py:1: sdxl_jax.models.unet imports sdxl_jax.weights.mapping\n"
        "    sdxl_jax/weights/mapping.py:2: sdxl_jax.weights.mapping imports sdxl_jax.models.unet",
    ]

    found = [v.split(" (")[0] for v in layer_violations(imports)]
    assert found == [
        # Twice: outside diffusion/, and the curriculum.
        *["sdxl_jax/diffusion/schedule.py:3: sdxl_jax.diffusion.schedule imports "
          "sdxl_jax.train.curriculum"] * 2,
        "sdxl_jax/models/unet.py:1: sdxl_jax.models.unet imports sdxl_jax.weights.mapping",
        "sdxl_jax/train/loop.py:1: sdxl_jax.train.loop imports experiments.common",
        "sdxl_jax/train/loop.py:2: sdxl_jax.train.loop imports sdxl_jax.train.curriculum",
    ]  # fmt: skip

    assert size_violations(modules, tmp_path) == [
        "sdxl_jax/data/pipeline.py: 601 lines (> 600: split it along a real seam)",
        "sdxl_jax/train/loop.py:3: function _run is 86 lines (> 80)",
        "sdxl_jax/train/loop.py:90: function Loop.step is 86 lines (> 80)",
    ]
