"""Evaluation runs: what to score with (``EvalSpec``, checked before anything loads), the
evaluators it builds, and the two drivers: generate-and-score over guidance scales
(``evaluate_generation``, behind ``python -m sdxl_jax.sample --eval``, training's final
scores and the curriculum) and scoring images that exist (``score_batches``, behind
``python -m sdxl_jax.eval``).

A run writes ``eval.json``: the settings, the prompt set and counts, one row of metrics per
guidance scale (with per-category rows where the prompt set has categories), the timings; and,
for a sweep of several scales, ``sweep.png``: FID against CLIP score, one labelled point per
scale (the paper's appendix figure).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.eval import evaluators as ev
from sdxl_jax.eval import folders
from sdxl_jax.eval.prompts import Prompt, PromptSet

MODES = ("pytorch-fid", "clean")
GRID_MAX = 64  # the contact sheet of an evaluation shows its first 64 images


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """What to measure and with which weights (paths as the user gave them)."""

    metrics: tuple[str, ...]
    inception: str | None = None  # FID Inception weights (.safetensors)
    clip: str | None = None  # a transformers CLIPModel folder
    ref: str | None = None  # FID reference: .npz, image folder or prepared dataset
    dims: int = 2048
    mode: str = "pytorch-fid"
    cache_dir: str | None = None
    batch_size: int = 50
    is_splits: int = 10  # Inception Score splits (torch-fidelity's default)

    def check(self, prompt_set: PromptSet | None) -> None:
        """Every problem found from the arguments alone, before models load or code compiles."""
        wanted = set(self.metrics)
        if self.mode not in MODES:
            raise folders.EvalInputError(f"--inception-mode {self.mode!r}: use one of {MODES}")
        if self.is_splits < 1:
            raise folders.EvalInputError(f"--splits {self.is_splits}: use at least 1")
        if self.dims not in (64, 192, 768, 2048):
            raise folders.EvalInputError(f"--dims {self.dims}: use 64, 192, 768 or 2048")
        if wanted & ev.INCEPTION_METRICS:
            from sdxl_jax.weights.inception import conversion_command

            if not self.inception:
                raise folders.EvalInputError(
                    f"--eval {','.join(sorted(wanted & ev.INCEPTION_METRICS))} needs --inception "
                    "pt_inception-2015-12-05.safetensors (pytorch-fid's FID Inception weights, "
                    f"converted from its .pth once with: {conversion_command()})"
                )
            if not Path(self.inception).is_file():
                raise folders.EvalInputError(
                    f"--inception {self.inception} does not exist; expected pytorch-fid's "
                    f"weights as safetensors, made with: {conversion_command()}"
                )
        if wanted & {"fid", "kid"} and not self.ref:
            if prompt_set is None or prompt_set.kind != "dataset":
                raise folders.EvalInputError(
                    "--eval fid needs reference images: --ref DIR|STATS.npz|DATASET, or prompts "
                    "from a prepared dataset (its images are the reference)"
                )
        if self.ref and not Path(self.ref).exists():
            raise folders.EvalInputError(f"--ref {self.ref} does not exist")
        if "clip" in wanted:
            if not self.clip:
                raise folders.EvalInputError(
                    "--eval clip needs --clip DIR: a transformers CLIPModel folder (config.json, "
                    "model.safetensors, tokenizer, preprocessor_config.json)"
                )
            if not (Path(self.clip) / "config.json").is_file():
                raise folders.EvalInputError(
                    f"--clip {self.clip} is not a CLIPModel folder (no config.json)"
                )
        if "synthetic" in wanted and prompt_set is not None and prompt_set.kind not in (
            "synthetic", "dataset", "text",
        ):  # fmt: skip
            raise folders.EvalInputError("--eval synthetic scores the synthetic captions only")


@dataclasses.dataclass
class Scorers:
    """The loaded extractors and reference statistics of an ``EvalSpec``, reused across a
    sweep's scales; ``fresh()`` gives new evaluators (empty accumulators) for each run."""

    spec: EvalSpec
    inception: Any = None
    clip: Any = None
    reference: Any = None
    reference_info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def fresh(self) -> list[ev.Evaluator]:
        wanted = set(self.spec.metrics)
        out: list[ev.Evaluator] = []
        if wanted & ev.INCEPTION_METRICS:
            out.append(ev.InceptionEvaluator(
                self.inception, wanted=wanted & ev.INCEPTION_METRICS, reference=self.reference,
                dims=self.spec.dims, is_splits=self.spec.is_splits,
            ))  # fmt: skip
        if "clip" in wanted:
            out.append(ev.CLIPScoreEvaluator(self.clip))
        if "synthetic" in wanted:
            out.append(ev.SyntheticEvaluator())
        return out


def load_scorers(
    spec: EvalSpec, prompt_set: PromptSet | None = None, *, mesh: Any = None
) -> Scorers:
    """Load the extractors ``spec`` needs and the FID reference statistics (cached)."""
    spec.check(prompt_set)
    scorers = Scorers(spec)
    wanted = set(spec.metrics)
    if wanted & ev.INCEPTION_METRICS:
        from sdxl_jax.eval.inception import InceptionExtractor

        scorers.inception = InceptionExtractor(
            spec.inception, mode=spec.mode, batch_size=spec.batch_size, mesh=mesh
        )
    if "clip" in wanted:
        from sdxl_jax.eval.clip import CLIPEmbedder

        scorers.clip = CLIPEmbedder(spec.clip, mesh=mesh)
    if wanted & {"fid", "kid"}:
        ref, records = spec.ref, None
        if ref is None:  # a prepared dataset's captions: the same records' images
            ref, records = prompt_set.name, [p.record for p in prompt_set.prompts]
        scorers.reference, scorers.reference_info = ev.reference_stats(
            ref, scorers.inception, dims=spec.dims, records=records, cache_dir=spec.cache_dir,
            batch_size=spec.batch_size,
        )  # fmt: skip
    return scorers


def score_batches(
    evaluators: Sequence[ev.Evaluator],
    batches: Iterable[tuple[Sequence[np.ndarray], Sequence[Prompt]]],
) -> dict[str, Any]:
    """Feed every evaluator each (images, prompts) batch; their results merged (per-category
    rows merged per category)."""
    for images, prompts in batches:
        for e in evaluators:
            e.add(images, prompts)
    return merge([e.result() for e in evaluators])


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in results:
        r = dict(r)
        for cat, row in r.pop("per_category", {}).items():
            out.setdefault("per_category", {}).setdefault(cat, {}).update(row)
        notes = r.pop("warnings", [])
        out.update(r)
        if notes:
            out.setdefault("warnings", []).extend(notes)
    return out


def evaluate_generation(
    generator: Any,
    prompt_set: PromptSet,
    scorers: Scorers,
    *,
    out: str | Path,
    guidance: Sequence[float],
    request: dict[str, Any],
    settings: dict[str, Any] | None = None,
    image_params: Any = None,
) -> dict[str, Any]:
    """Generate ``prompt_set`` at each guidance scale with ``generator`` (a loaded
    ``Generator``; ``request``: ``make_request``'s other keyword arguments), score, write the
    images (one folder per scale in a sweep), ``eval.json`` and, for a sweep, ``sweep.png``.
    ``image_params(record) -> dict`` chooses what each PNG records (default: the record)."""
    from sdxl_jax.inference.generate import make_request
    from sdxl_jax.inference.outputs import ImageFolder

    out = Path(out)
    rows, t_start = [], time.perf_counter()
    for g in guidance:
        req = make_request(generator.models, prompt_set.texts, guidance=g, **request)
        folder = ImageFolder(
            out / f"guidance_{g:g}" if len(guidance) > 1 else out, grid_max=GRID_MAX
        )
        evaluators = scorers.fresh()
        batch_s, score_s = [], 0.0
        t0 = time.perf_counter()
        for batch in generator.batches(req):
            if not batch.finite.all():  # black images would be scored as if they were samples
                from sdxl_jax.inference.generate import NonFiniteError

                raise NonFiniteError(np.asarray(batch.indices)[~batch.finite].tolist())
            batch_s.append(batch.seconds)
            for img, rec in zip(batch.images, batch.records, strict=True):
                folder.write(img, image_params(rec) if image_params else rec)
            prompts = [prompt_set.prompts[i // req.num_images] for i in batch.indices]
            t1 = time.perf_counter()
            for e in evaluators:
                e.add(list(batch.images), prompts)
            score_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        row = {"guidance": g, **merge([e.result() for e in evaluators])}
        score_s += time.perf_counter() - t1
        row["timings"] = {
            **generator.timings(batch_s, t0), "scoring_s": round(score_s, 3),
        }  # fmt: skip
        folder.finish(settings={**(settings or {}), "guidance": g}, timings=row["timings"])
        rows.append(row)
    report = {
        "settings": {**(settings or {}), **dataclasses.asdict(scorers.spec)},
        "prompt_set": {"name": prompt_set.name, "kind": prompt_set.kind, "prompts": len(prompt_set),
                       "images_per_prompt": request.get("num_images", 1)},
        "extractors": extractors(scorers),
        **scorers.reference_info,
        "results": rows,
        "total_s": round(time.perf_counter() - t_start, 3),
    }  # fmt: skip
    write_report(report, out)
    return report


def extractors(scorers: Scorers) -> dict[str, Any]:
    out = {}
    for name in ("inception", "clip"):
        ex = getattr(scorers, name)
        if ex is not None:
            out[name] = ex.fingerprint
    return out


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """``eval.json`` and, for two or more rows with FID and CLIP score, ``sweep.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=jsonable))
    rows = report.get("results", [])
    if len(rows) > 1 and all("fid" in r and "clip_score" in r for r in rows):
        sweep_plot(rows, out / "sweep.png")
    return out / "eval.json"


def jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def sweep_plot(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """FID (y) against CLIP score (x), one labelled point per guidance scale, joined in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["clip_score"] for r in rows]
    y = [r["fid"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(x, y, "-o", color="tab:blue")
    for r, xi, yi in zip(rows, x, y, strict=True):
        ax.annotate(f"cfg {r['guidance']:g}", (xi, yi), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("CLIP score")
    ax.set_ylabel("FID")
    ax.set_title("FID vs CLIP score over guidance scales")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
