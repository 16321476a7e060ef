"""What benchmarks/microconditioning.py measures on an image, and its confidence intervals.

- accuracy of colour / shape / position / all three against the caption (the exact scorer,
  ``sdxl_jax.data.synthetic.analyse``);
- placement, from the scorer's shape box (a side cut by the border is restored, so a cut shape's
  box crosses it): margin_x / margin_y = px from the box to the nearest left/right, top/bottom
  border (negative: cut); "whole" = box >= 1 px inside every border and its centroid 10..40% of
  each axis from its near edge; "cut" = box within 1 px of a border or beyond;
- edge width (px): from r2 = gradient energy after / before a Gaussian blur of sigma = 1 px (RGB
  forward differences). A step edge blurred to a Gaussian of width w has r2 = w / sqrt(w^2 +
  sigma^2), so w = sigma * r2 / sqrt(1 - r2^2) (~w for w in 0.5..2 px, tested; saturates near
  3 px on these small shapes); independent of contrast and object size. Mean gradient magnitude
  is not a sharpness measure here: blur spreads an edge's gradient without changing its sum;
- a feature distance to the training distribution ("FD", FID-like): the Frechet distance of
  ``sdxl_jax.eval.metrics.frechet_distance`` (pytorch-fid's formula) between 256-d features of
  two image sets: the 8x8 area means of the RGB image / 255 (192 numbers: colour and layout)
  and 10 x the root mean square of its gradient / 255 over the same cells (64: where the edges
  are and how sharp; blur lowers it, where it leaves a plain mean unchanged; the 10 gives both
  halves a similar spread, ~0.15, on the training images). No Inception
  network is involved (its weights are not downloadable here); values are comparable only
  with each other, at the same image and reference counts.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from sdxl_jax.data import synthetic

KEYS = ("colour", "shape", "position", "all", "whole", "cut", "margin_x", "margin_y", "edge_px")


def edge_width(image: np.ndarray, sigma: float = 1.0) -> float:
    """Effective Gaussian edge width in px of uint8 [H, W, 3] (module docstring); NaN if flat."""

    def energy(a):
        return (np.diff(a, axis=0) ** 2).sum() + (np.diff(a, axis=1) ** 2).sum()

    x = image.astype(np.float64)
    e0 = energy(x)
    if e0 < 1e-6:
        return float("nan")
    r2 = min(energy(ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest")) / e0, 0.999)
    return float(sigma * r2 / np.sqrt(1 - r2 * r2))


def placement(analysis: dict, height: int, width: int) -> dict:
    """{"found", "whole", "cut", "margin_x", "margin_y"} from synthetic.analyse's box/centroid."""
    box = analysis["box"]
    if box is None:
        return dict(found=False, whole=False, cut=False, margin_x=None, margin_y=None)
    x0, y0, w, h = box
    mx, my = min(x0, width - x0 - w), min(y0, height - y0 - h)
    cy, cx = analysis["centroid"]
    near = [min(cy, height - cy) / height, min(cx, width - cx) / width]  # from the near edge
    inner = all(0.1 <= f <= 0.4 for f in near)
    cut = min(mx, my) < 1.0
    return dict(found=True, whole=not cut and inner, cut=cut, margin_x=mx, margin_y=my)


def per_image(imgs, captions) -> dict[str, np.ndarray]:
    """{key: float [N]} for KEYS (NaN where undefined: no shape found, flat image) and "found";
    captions None score accuracy as NaN (dataset images)."""
    rows = []
    for img, cap in zip(imgs, captions, strict=True):
        a = synthetic.analyse(img)
        got = (a["colour"], a["shape"], a["position"])
        if cap:
            want = synthetic.parse_caption(cap)
            ok = {k: float(g == t) for k, g, t in zip(KEYS[:3], got, want, strict=True)}
            ok["all"] = float(all(ok.values()))
        else:
            ok = dict.fromkeys(KEYS[:4], np.nan)
        p = placement(a, *img.shape[:2])
        p = {k: np.nan if v is None else float(v) for k, v in p.items()}
        rows.append({**ok, **p, "edge_px": edge_width(img)})
    return {k: np.array([r[k] for r in rows], np.float64) for k in (*KEYS, "found")}


def summary(values: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Mean of each per-image measure over the images where it is defined."""
    out: dict[str, float | None] = {"n": int(len(next(iter(values.values()))))}
    for k, v in values.items():
        ok = v[np.isfinite(v)]
        out[k] = round(float(ok.mean()), 4) if len(ok) else None
    return out


def paired_difference(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """mean(b) - mean(a) of paired per-image values (image i of both made from the same
    caption and noise) with a 95% percentile bootstrap over images; pairs with a NaN left out."""
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return dict(a=float("nan"), b=float("nan"), diff=float("nan"), lo=float("nan"),
                    hi=float("nan"), n=int(len(a)))  # fmt: skip
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = b[idx].mean(1) - a[idx].mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return dict(a=float(a.mean()), b=float(b.mean()), diff=float(b.mean() - a.mean()),
                lo=float(lo), hi=float(hi), n=int(len(a)))  # fmt: skip


def mean_interval(v: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of the finite values."""
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def features(imgs: np.ndarray) -> np.ndarray:
    """float64 [N, 256]: 8x8 area means of RGB / 255 and 10 x the RMS gradient / 255 per cell."""
    x = np.asarray(imgs, np.float64) / 255.0  # [N, H, W, 3]
    n, h, w, _ = x.shape
    if h % 8 or w % 8:
        raise ValueError(f"feature distance needs sides divisible by 8, got {h}x{w}")
    gy = np.diff(x, axis=1, append=x[:, -1:]).mean(-1)
    gx = np.diff(x, axis=2, append=x[:, :, -1:]).mean(-1)
    energy = gx**2 + gy**2  # [N, H, W]
    rgb = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean((2, 4)).reshape(n, -1)
    edges = 10 * np.sqrt(energy.reshape(n, 8, h // 8, 8, w // 8).mean((2, 4))).reshape(n, -1)
    return np.concatenate([rgb, edges], axis=1)


def feature_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """Frechet distance of ``features`` (module docstring) of two uint8 image sets."""
    from sdxl_jax.eval.metrics import frechet_distance

    f, r = features(generated), features(reference)
    return float(
        frechet_distance(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    )
