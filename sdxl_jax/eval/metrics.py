"""The metrics, as the tools practitioners trust compute them, on features already extracted.

- FID: pytorch-fid's ``calculate_frechet_distance`` (float64 mean and covariance, ``np.cov``
  with N-1; ``scipy.linalg.sqrtm`` of the product; ``eps`` added to both diagonals when the
  root is not finite; a small imaginary part dropped, a large one an error).
- KID: torch-fidelity's unbiased MMD^2 with the cubic polynomial kernel
  ``(x.y / d + 1)^3`` over ``subsets`` random subsets (seed 2020).
- Inception Score: torch-fidelity's ``isc`` (the logits without the fc bias, shuffled with
  seed 2020, ``splits`` chunks, exp of the mean KL to the chunk's marginal; mean and std).
- CLIP score: torchmetrics' ``CLIPScore``: ``max(mean(100 * cos(image, text)), 0)`` of the
  projected, L2-normalised embeddings.

The Frechet distance runs in float64 with scipy, as the reference does: its square root of a
2048^2 matrix is where FID values differ between implementations, and matching pytorch-fid to
1e-6 needs the same algorithm. Feature extraction, the expensive part, runs in JAX.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

STATS_VERSION = 1


class StatsMismatch(ValueError):
    """Cached statistics computed with another extractor, input mode or feature width."""


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid computes it."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"FID of features of different widths: {mu1.shape[0]} and {mu2.shape[0]}; compute "
            "both with the same --dims"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: the covariance product is singular; adding {eps} to both diagonals",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"FID: the square root has an imaginary component of {m}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclasses.dataclass(frozen=True)
class Stats:
    """Feature statistics of an image set, with what computed them."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int
    fingerprint: dict[str, Any]  # the extractor: weights hash, input mode, resolution, ...
    features: np.ndarray | None = None  # [N, D] float32, kept for KID

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])


def stats_of(
    features: np.ndarray, fingerprint: dict[str, Any], *, keep_features: bool = True
) -> Stats:
    """Mean and covariance (N-1) in float64 of ``features`` [N, D]."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature rows, got shape {features.shape}")
    f64 = features.astype(np.float64)
    kept = features.astype(np.float32) if keep_features else None
    return Stats(f64.mean(0), np.cov(f64, rowvar=False), len(f64), dict(fingerprint), kept)


def save_stats(stats: Stats, path: str | Path) -> Path:
    """``.npz``: mu, sigma, count, the fingerprint as JSON, (features for KID)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(
        mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count),
        fingerprint=np.array(json.dumps(stats.fingerprint, sort_keys=True)),
        version=np.int64(STATS_VERSION),
    )  # fmt: skip
    if stats.features is not None:
        arrays["features"] = stats.features
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_stats(
    path: str | Path, *, expect: dict[str, Any] | None = None, dims: int | None = None
) -> Stats:
    """Statistics saved by :func:`save_stats`; refused when ``expect`` (the extractor in use)
    or ``dims`` disagree with what computed them. pytorch-fid's own ``.npz`` (mu, sigma only)
    has no fingerprint and is accepted with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{path} holds {sorted(z.files)}, not FID statistics (mu, sigma)")
        fp = json.loads(str(z["fingerprint"])) if "fingerprint" in z.files else None
        stats = Stats(
            z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
            int(z["count"]) if "count" in z.files else -1, fp or {},
            z["features"] if "features" in z.files else None,
        )  # fmt: skip
    if dims is not None and stats.dims != dims:
        raise StatsMismatch(
            f"{path} holds {stats.dims}-d features, this run uses {dims}; recompute it with "
            f"`python -m sdxl_jax.eval stats ... --dims {dims}` or pass --dims {stats.dims}"
        )
    if expect is not None:
        if fp is None:
            warnings.warn(
                f"{path} does not say which extractor made it (pytorch-fid's format); trusting "
                "that it used the same Inception weights and input mode",
                stacklevel=2,
            )
        else:
            diff = {k: (fp.get(k), v) for k, v in expect.items() if fp.get(k) != v}
            if diff:
                what = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
                raise StatsMismatch(
                    f"{path} was computed with another extractor ({what}); statistics are only "
                    "comparable from the same weights and input mode: recompute them with "
                    "`python -m sdxl_jax.eval stats`"
                )
    return stats


def fid(generated: Stats, reference: Stats) -> float:
    """FID between two statistics; warns when either set has fewer images than dimensions."""
    for name, s in (("generated", generated), ("reference", reference)):
        if 0 < s.count < s.dims:
            warnings.warn(low_count_warning(name, s.count, s.dims), stacklevel=2)
    return frechet_distance(generated.mu, generated.sigma, reference.mu, reference.sigma)


def low_count_warning(name: str, count: int, dims: int) -> str:
    return (
        f"FID from {count} {name} images with {dims}-d features: the covariance is rank-"
        f"deficient below {dims} images and FID is biased upwards at this count; compare only "
        "FIDs computed from the same number of images"
    )


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = k_xx.shape[0]
    xx = k_xx.sum() - np.trace(k_xx)
    yy = k_yy.sum() - np.trace(k_yy)
    return float((xx + yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets), torch-fidelity's definition.
    ``subset_size`` larger than either set is an error, as there."""
    n1, n2 = len(features1), len(features2)
    if min(n1, n2) < subset_size:
        raise ValueError(
            f"KID subset size {subset_size} is larger than a feature set ({n1} and {n2} "
            "images); lower the subset size"
        )
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    gamma = 1.0 / f1.shape[1]
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(n1, subset_size, replace=False)]
        y = f2[rng.choice(n2, subset_size, replace=False)]
        k = lambda a, b: (a @ b.T * gamma + 1.0) ** 3  # noqa: E731
        mmds[i] = _mmd2_unbiased(k(x, x), k(x, y), k(y, y))
    return float(mmds.mean()), float(mmds.std())


def inception_score(
    logits: np.ndarray, *, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of logits [N, C], torch-fidelity's way."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs >= {splits} images, got {n}")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(axis=0, keepdims=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - np.log(q))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def clip_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per-pair 100 x cosine similarity [N] (embeddings normalised again, to be safe)."""
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"CLIP score of {a.shape} image and {b.shape} text embeddings")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 100.0 * (a * b).sum(-1)


def clip_score(per_pair: np.ndarray) -> float:
    """torchmetrics' CLIPScore: the mean of the per-pair scores, floored at 0."""
    per_pair = np.asarray(per_pair, np.float64)
    if per_pair.size == 0:
        raise ValueError("CLIP score of no images")
    return float(max(per_pair.mean(), 0.0))
