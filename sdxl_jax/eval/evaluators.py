"""Evaluators: each takes batches of images with their prompts as they are generated or read
(nothing holds all images at once), then reports its metrics.

- ``InceptionEvaluator``: FID (and KID) against reference statistics, Inception Score; one
  Inception pass serves all three.
- ``CLIPScoreEvaluator``: the CLIP score, overall and per prompt category.
- ``SyntheticEvaluator``: the synthetic dataset's exact caption match (colour, shape,
  position), overall and per shape.

``METRICS`` names what ``--eval`` accepts; ``build`` makes the evaluators a metric list needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sdxl_jax.eval import folders, metrics
from sdxl_jax.eval.prompts import Prompt

METRICS = ("fid", "kid", "is", "clip", "synthetic")
INCEPTION_METRICS = frozenset({"fid", "kid", "is"})


class Evaluator(Protocol):
    name: str

    def add(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> None: ...

    def result(self) -> dict[str, Any]: ...


def parse_metrics(spec: str) -> tuple[str, ...]:
    """``"fid,clip"`` -> ("fid", "clip"); unknown names are an error listing the known ones."""
    names = tuple(dict.fromkeys(s.strip().lower() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise folders.EvalInputError(
            f"--eval {spec!r}: unknown metric {unknown[0] if unknown else '(none)'}; use a "
            f"comma-separated list of {', '.join(METRICS)}"
        )
    return names


class InceptionEvaluator:
    """FID / KID against ``reference`` and the Inception Score, from one feature pass."""

    name = "inception"

    def __init__(
        self,
        extractor: Any,
        *,
        wanted: Sequence[str],
        reference: metrics.Stats | None = None,
        dims: int = 2048,
        is_splits: int = 10,
        kid_subset_size: int = 1000,
    ):
        self.extractor, self.wanted, self.reference = extractor, set(wanted), reference
        self.dims, self.is_splits, self.kid_subset_size = dims, is_splits, kid_subset_size
        if self.wanted & {"fid", "kid"} and reference is None:
            raise folders.EvalInputError("FID and KID need reference statistics (--ref)")
        self._features: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []

    def add(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> None:
        out = self.extractor.features(list(images))
        self._features.append(np.asarray(out[str(self.dims)], np.float32))
        if "is" in self.wanted:
            self._logits.append(np.asarray(out["logits_unbiased"], np.float64))

    def features(self) -> np.ndarray:
        return np.concatenate(self._features) if self._features else np.zeros((0, self.dims))

    def result(self) -> dict[str, Any]:
        feats = self.features()
        out: dict[str, Any] = {"inception_images": len(feats), "fid_dims": self.dims}
        notes = []
        if self.wanted & {"fid", "kid"}:
            if len(feats) < 2:
                raise folders.EvalInputError(f"FID needs at least 2 images, got {len(feats)}")
            ref = self.reference
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out["fid"] = metrics.fid(metrics.stats_of(feats, {}), ref)
            notes += [str(w.message) for w in caught]
            out["fid_reference_images"] = ref.count
        if "kid" in self.wanted:
            out.update(self._kid(feats, notes))
        if "is" in self.wanted:
            mean, std = metrics.inception_score(np.concatenate(self._logits), splits=self.is_splits)
            out["is"], out["is_std"] = mean, std
        if notes:
            out["warnings"] = notes
        return out

    def _kid(self, feats: np.ndarray, notes: list[str]) -> dict[str, Any]:
        ref = self.reference.features
        if ref is None:
            notes.append("KID needs the reference features; these statistics hold only mu/sigma")
            return {}
        size = min(self.kid_subset_size, len(feats), len(ref))
        if size < self.kid_subset_size:
            notes.append(f"KID subsets of {size} images (fewer than {self.kid_subset_size})")
        mean, std = metrics.kid(feats, ref, subset_size=size)
        return {"kid": mean, "kid_std": std, "kid_subset_size": size}


class CLIPScoreEvaluator:
    """CLIP score of each image with its prompt; the mean overall and per category."""

    name = "clip"

    def __init__(self, embedder: Any):
        self.embedder = embedder
        self._scores: list[np.ndarray] = []
        self._categories: list[str | None] = []

    def add(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> None:
        img = self.embedder.image_embeds(list(images))
        txt = self.embedder.text_embeds([p.text for p in prompts])
        self._scores.append(metrics.clip_scores(img, txt))
        self._categories += [p.category for p in prompts]

    def result(self) -> dict[str, Any]:
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        out: dict[str, Any] = {"clip_score": metrics.clip_score(scores), "clip_images": len(scores)}
        cats = _by_category(self._categories)
        if cats:
            out["per_category"] = {
                c: {"count": len(idx), "clip_score": metrics.clip_score(scores[idx])}
                for c, idx in cats.items()
            }
        return out


class SyntheticEvaluator:
    """The synthetic dataset's exact scorer: is each caption's colour, shape, position drawn."""

    name = "synthetic"

    def __init__(self) -> None:
        self._scores: list[dict[str, bool]] = []
        self._categories: list[str | None] = []

    def add(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> None:
        from sdxl_jax.data import synthetic

        for img, p in zip(images, prompts, strict=True):
            try:
                self._scores.append(synthetic.score(np.asarray(img), p.text))
            except ValueError as e:
                raise folders.EvalInputError(
                    f"--eval synthetic scores the synthetic captions only; {p.text!r}: {e}"
                ) from e
            self._categories.append(p.category)

    def result(self) -> dict[str, Any]:
        from sdxl_jax.data import synthetic

        if not self._scores:
            raise folders.EvalInputError("the synthetic scorer got no images")
        keys = ("colour", "shape", "position", "all")
        acc = lambda rows: {k: float(np.mean([r[k] for r in rows])) for k in keys}  # noqa: E731
        out: dict[str, Any] = {
            **{f"synthetic_{k}": v for k, v in acc(self._scores).items()},
            "synthetic_images": len(self._scores),
            "synthetic_chance": synthetic.chance_levels(),
        }
        cats = _by_category(self._categories)
        if cats:
            out["per_category"] = {
                c: {"count": len(idx), **acc([self._scores[i] for i in idx])}
                for c, idx in cats.items()
            }
        return out


def _by_category(categories: Sequence[str | None]) -> dict[str, np.ndarray]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        if c is not None:
            groups[c].append(i)
    return {c: np.asarray(idx) for c, idx in sorted(groups.items())}


# -- reference statistics ------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("SDXL_CACHE_DIR") or Path.home() / ".cache" / "sdxl_jax"
    return Path(root) / "fid_stats"


def _key(source: str, items: Sequence[str], fingerprint: dict[str, Any], dims: int) -> str:
    h = hashlib.sha256(json.dumps([source, list(items), fingerprint, dims]).encode())
    return h.hexdigest()[:20]


def image_source(
    path: str | Path, records: Sequence[int] | None, batch_size: int
) -> tuple[list[str], Callable[[folders.Skipped], Iterator[list[np.ndarray]]]]:
    """What identifies the images of ``path`` (a folder or a prepared dataset's ``records``)
    for the cache key, and a function giving them in batches."""
    path = Path(path)
    if (path / "sdxl_index.npz").exists():
        index = (path / "sdxl_index.npz").stat()
        items = [str(index.st_size), str(index.st_mtime_ns)]
        items += ["all"] if records is None else [str(int(r)) for r in records]
        return items, lambda skipped: folders.dataset_batches(path, records, batch_size, skipped)
    files = folders.image_files(path)
    items = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return items, lambda skipped: (
        imgs for _, imgs in folders.read_batches(files, batch_size, skipped)
    )


def compute_stats(
    batches: Iterable[list[np.ndarray]], extractor: Any, dims: int, what: str
) -> metrics.Stats:
    """Statistics of the ``dims``-d features of every image ``batches`` yields."""
    feats = [np.asarray(extractor.features(imgs)[str(dims)], np.float32) for imgs in batches]
    count = sum(len(f) for f in feats)
    if count < 2:
        raise folders.EvalInputError(f"{what}: {count} readable images; statistics need 2+")
    return metrics.stats_of(np.concatenate(feats), extractor.fingerprint)


def reference_stats(
    ref: str | Path,
    extractor: Any,
    *,
    dims: int = 2048,
    records: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 50,
) -> tuple[metrics.Stats, dict[str, Any]]:
    """Statistics of ``ref``: a ``.npz`` (checked against ``extractor``), a folder of images or
    a prepared dataset (``records`` of it). Computed ones are cached by content and extractor.
    Returns the stats and a description for the report."""
    ref = Path(ref)
    fp = extractor.fingerprint
    info: dict[str, Any] = {"reference": str(ref)}
    if ref.suffix == ".npz":
        stats = metrics.load_stats(ref, expect=fp, dims=dims)
        return stats, {**info, "reference_images": stats.count}
    items, batches = image_source(ref, records, batch_size)
    key = _key(str(ref.resolve()), items, fp, dims)
    cache = Path(cache_dir or default_cache_dir()) / f"{key}.npz"
    info["reference_cache"] = str(cache)
    if cache.exists():
        stats = metrics.load_stats(cache, expect=fp, dims=dims)
        return stats, {**info, "reference_images": stats.count}
    skipped = folders.Skipped()
    stats = compute_stats(progress(batches(skipped), "reference"), extractor, dims, str(ref))
    metrics.save_stats(stats, cache)
    return stats, {**info, "reference_images": stats.count, "reference_skipped": skipped.as_dict()}


def progress(batches: Iterable[Any], what: str, *, images: Any = len) -> Iterator[Any]:
    """Batches passed through, with a progress line (images, images/s) on stderr;
    ``images(batch)`` is the batch's image count (default ``len``)."""
    from tqdm import tqdm

    with tqdm(unit="img", desc=f"features ({what})", leave=False) as bar:
        for b in batches:
            yield b
            bar.update(images(b))
