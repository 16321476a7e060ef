"""Size and crop conditioning of a trained SDXL base (paper section 2.2, figs. 4 and 5), measured.

    python benchmarks/microconditioning.py --checkpoint runs/tiny_curriculum/base_1024/export \\
        --out runs/tiny_curriculum/eval/microconditioning

Samples the 72 synthetic captions (DDIM, --images-per-caption each) once per condition with the
same initial noise, so conditions differ only in the time ids (original size, crop top-left,
target size; the negative branch gets zero text and the same time ids, as diffusers does):
- crops: (0, 0) and each --crops (top, left) offset. A crop only ever came with an original larger
  than the bucket, so the original is the image in which the window is centred: target + 2 * crop
  (crop (0, 32) at 64 px -> original 64x128). Resize-to-cover crops one axis only, so offsets on
  both axes ((16, 16), (32, 32): the paper's fig. 5 corner case) never occurred in training.
  The tiny curriculum's centre crops reach 9 px at 64 px (tiny_aspect_64, base_1024) and 16 px
  at 32 px (tiny_square_32, base_256); larger offsets are extrapolation.
- original sizes: each --sizes s as s x s at crop (0, 0) (original = target is the (0, 0) row).

Measured with the exact scorer (sdxl_jax.data.synthetic.analyse) per condition:
- accuracy of colour / shape / position / all three against the caption;
- placement, from the scorer's shape box (a side cut by the border is restored, so a cut shape's
  box crosses it): margin_x / margin_y = px from the box to the nearest left/right, top/bottom
  border (negative: cut); "whole" = box >= 1 px inside every border and its centroid 10..40% of
  each axis from its near edge (inside its quadrant, clear of border and middle line); "cut" =
  box within 1 px of a border or beyond; the rest: no shape found, or whole but off-centre;
- edge width (px): from r2 = gradient energy after / before a Gaussian blur of sigma = 1 px (RGB
  forward differences). A step edge blurred to a Gaussian of width w has r2 = w / sqrt(w^2 +
  sigma^2), so w = sigma * r2 / sqrt(1 - r2^2) (~w for w in 0.5..2 px, tested; saturates near
  3 px on these small shapes); independent of contrast and object size. Mean gradient magnitude
  is not a sharpness measure here: blur spreads an edge's gradient without changing its sum.
References from the dataset itself (synthetic.examples, --reference images, centre crops): edge
width of training images (--bucket-set) by original short side (originals up to 160 px short
side: 256 is extrapolation), and placement in centre crops into a --size square by crop offset
(up to --size / 2 for 2:1 images): what those conditioning values meant in the data.

Writes DIR/microconditioning.json and DIR/<condition>.png (contact sheet, caption-major).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdxl_jax.data import buckets, images, synthetic  # noqa: E402

CAPTIONS = [
    synthetic.caption_for(c, s, p)
    for c in synthetic.COLOURS
    for s in synthetic.SHAPES
    for p in synthetic.POSITIONS
]
SIZE_BANDS = ((24, 32), (32, 48), (48, 96), (96, 161))  # reference: original short side, px
CROP_BANDS = ((0, 0), (1, 10), (11, 20), (21, 32))  # reference: max(top, left), px (at 64 px)


def pair(text: str) -> tuple[int, int]:
    top, left = (int(v) for v in text.split(","))
    return top, left


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="an SDXL base diffusers folder (export)")
    p.add_argument("--images-per-caption", type=int, default=2, help="per condition (default 2)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4)")
    p.add_argument("--size", type=int, default=64, help="target (square) side in px (default 64)")
    p.add_argument("--seed", type=int, default=0, help="initial noise seed (same per condition)")
    p.add_argument("--crops", type=pair, nargs="+", default=[(0, 16), (16, 0), (16, 16),
                   (0, 32), (32, 32)], help="TOP,LEFT offsets compared with 0,0")  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", default=[24, 32, 128, 256],
                   help="square original sides compared with --size")  # fmt: skip
    p.add_argument("--reference", type=int, default=288, help="dataset images for references")
    p.add_argument("--bucket-set", default="tiny_aspect_64", help="buckets of the training data")
    p.add_argument("--out", default="microconditioning", help="output folder")
    return p.parse_args(argv)


def conditions(size: int, crops, sizes) -> list[dict]:
    """[{name, original (h, w), crop (top, left)}]: (0, 0) first, then crops, then sizes."""
    out = [dict(name=f"crop_0_0_size_{size}", original=(size, size), crop=(0, 0))]
    for top, left in crops:
        orig = (size + 2 * top, size + 2 * left)  # the window centred in the original
        out.append(dict(name=f"crop_{top}_{left}", original=orig, crop=(top, left)))
    out += [dict(name=f"size_{s}", original=(s, s), crop=(0, 0)) for s in sizes if s != size]
    return out


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


def measure(imgs, captions) -> dict:
    """Accuracy, placement and edge width of uint8 images [N, H, W, 3] with their captions."""
    rows = []
    for img, cap in zip(imgs, captions, strict=True):
        a = synthetic.analyse(img)
        want = synthetic.parse_caption(cap) if cap else (None,) * 3
        got = (a["colour"], a["shape"], a["position"])
        ok = {k: g == t for k, g, t in zip(("colour", "shape", "position"), got, want, strict=True)}
        ok["all"] = all(ok.values())
        rows.append({**ok, **placement(a, *img.shape[:2]), "edge_px": edge_width(img)})

    def mean(key):
        vals = [float(r[key]) for r in rows if r[key] is not None and np.isfinite(r[key])]
        return round(float(np.mean(vals)), 3) if vals else None

    keys = ("colour", "shape", "position", "all", "whole", "cut", "found")
    return {"n": len(rows), **{k: mean(k) for k in (*keys, "margin_x", "margin_y", "edge_px")}}


def reference(n: int, bucket_set: str, size: int) -> dict:
    """Dataset images as training saw them: edge width by original size, placement by crop."""
    bs = buckets.bucket_set(bucket_set)
    by_size, by_crop = {b: [] for b in SIZE_BANDS}, {b: [] for b in CROP_BANDS}
    for ex in synthetic.examples(n):
        img = images.decode_rgb(ex["image"])
        short = min(ex["height"], ex["width"])
        b = bs.nearest(ex["height"], ex["width"])
        crop = buckets.plan_crop((ex["height"], ex["width"]), bs.sizes[b])
        for lo, hi in SIZE_BANDS:
            if lo <= short < hi:
                by_size[(lo, hi)].append(buckets.apply_crop(img, crop))
        sq = buckets.plan_crop((ex["height"], ex["width"]), (size, size))
        off = max(sq.top, sq.left)
        for lo, hi in CROP_BANDS:
            if lo <= off <= hi:
                by_crop[(lo, hi)].append(buckets.apply_crop(img, sq))
    sizes = {f"{lo}-{hi - 1}": measure(v, [None] * len(v)) for (lo, hi), v in by_size.items() if v}
    crops = {f"{lo}-{hi}": measure(v, [None] * len(v)) for (lo, hi), v in by_crop.items() if v}
    return {"edge_by_original_short_side": sizes, "placement_by_crop_offset": crops}


def sample(args, conds: list[dict]) -> tuple[dict, dict]:
    """{name: uint8 [N, H, W, 3]} for every condition (same captions and noise), and timings."""
    from sdxl_jax.inference import generate

    t0 = time.perf_counter()
    models = generate.check_models(args.checkpoint)
    if models.base.role != "base":
        raise ValueError(f"{args.checkpoint} is an SDXL refiner; pass a base export")
    n = len(CAPTIONS) * args.images_per_caption
    gen = generate.Generator(models, dtype="fp32", batch_size=n)  # one batch per condition
    load_s = time.perf_counter() - t0
    out, cond_s = {}, []
    for c in conds:
        t = time.perf_counter()
        request = generate.make_request(
            models, CAPTIONS, num_images=args.images_per_caption, steps=args.steps,
            guidance=args.guidance, sampler="ddim", height=args.size, width=args.size,
            seed=args.seed, original_size=c["original"], crop=c["crop"],
        )  # fmt: skip
        out[c["name"]] = gen(request).images
        cond_s.append(time.perf_counter() - t)
        print(f"  sampled {c['name']}: {n} images in {cond_s[-1]:.1f} s", file=sys.stderr)
    return out, dict(load_s=load_s, first_condition_s=cond_s[0], per_condition_s=cond_s[1:])


def nearest_band(table: dict, value: int) -> tuple[str, dict]:
    """The ("lo-hi", row) of a reference table holding ``value``, else the closest band."""

    def distance(key):
        lo, hi = (int(v) for v in key.split("-"))
        return max(lo - value, value - hi, 0)

    key = min(table, key=distance)
    return key, table[key]


def fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.images_per_caption < 1 or args.steps < 1 or args.size < 8:
        print("error: need --images-per-caption >= 1, --steps >= 1, --size >= 8", file=sys.stderr)
        return 2
    conds = conditions(args.size, args.crops, args.sizes)
    try:
        buckets.bucket_set(args.bucket_set)  # fail before sampling, not after
        imgs, timings = sample(args, conds)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from PIL import Image

    from sdxl_jax.inference.outputs import contact_sheet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    prompts = [c for c in CAPTIONS for _ in range(args.images_per_caption)]
    for c in conds:
        c.update(measure(imgs[c["name"]], prompts))
        Image.fromarray(contact_sheet(list(imgs[c["name"]]))).save(out / f"{c['name']}.png")
    ref = reference(args.reference, args.bucket_set, args.size)
    timings.update(measure_s=time.perf_counter() - t, total_s=time.perf_counter() - t_start)

    head = f"{'condition':<18}{'original':>10}{'crop':>9}  colour shape  pos   all  whole  cut"
    print(head + "  mrg_x  mrg_y  edge_px")
    for c in conds:
        o, cr = c["original"], c["crop"]
        print(
            f"{c['name']:<18}{f'{o[0]}x{o[1]}':>10}{f'{cr[0]},{cr[1]}':>9}"
            + "".join(f"{fmt(c[k], True):>6}" for k in ("colour", "shape", "position", "all"))
            + f"{fmt(c['whole'], True):>7}{fmt(c['cut'], True):>5}"
            + "".join(f"{fmt(c[k]):>7}" for k in ("margin_x", "margin_y", "edge_px"))
        )
    print(f"reference: {args.reference} dataset images ({args.bucket_set}; square for crops)")
    for band, r in ref["edge_by_original_short_side"].items():
        print(f"  original short side {band:>7} px: edge {fmt(r['edge_px'])} px (n={r['n']})")
    for band, r in ref["placement_by_crop_offset"].items():
        print(
            f"  crop offset {band:>5} px: whole {fmt(r['whole'], True)}, cut {fmt(r['cut'], True)}"
            f", margins {fmt(r['margin_x'])} / {fmt(r['margin_y'])} px (n={r['n']})"
        )
    base, rest = conds[0], conds[1:]
    crops = [c for c in rest if c["crop"] != (0, 0)]
    sizes = sorted([base] + [c for c in rest if c["crop"] == (0, 0)], key=lambda c: c["original"])
    crop_ref, size_ref = ref["placement_by_crop_offset"], ref["edge_by_original_short_side"]
    lines = []
    for c in [base, *crops]:
        band, r = nearest_band(crop_ref, max(c["crop"]))
        lines.append(
            f"crop {c['crop'][0]},{c['crop'][1]}: {fmt(c['whole'], True)} whole, "
            f"{fmt(c['cut'], True)} cut, margins x/y {fmt(c['margin_x'])}/{fmt(c['margin_y'])} px"
            f" (dataset crops {band} px: {fmt(r['whole'], True)} whole)"
        )
    print("crop effect (fig. 5): " + "; ".join(lines))
    lines = []
    for c in sizes:
        band, r = nearest_band(size_ref, min(c["original"]))
        lines.append(
            f"original {c['original'][0]}: edge {fmt(c['edge_px'])} px "
            f"(dataset {band} px: {fmt(r['edge_px'])})"
        )
    print("size effect (fig. 4): " + "; ".join(lines))
    print(
        f"time: load {timings['load_s']:.1f} s, first condition {timings['first_condition_s']:.1f}"
        f" s (compile), {np.mean(timings['per_condition_s'] or [0]):.1f} s per condition after, "
        f"scoring {timings['measure_s']:.1f} s, total {timings['total_s']:.1f} s"
    )
    for c in conds:
        c["original"], c["crop"] = list(c["original"]), list(c["crop"])
    result = dict(settings=vars(args), conditions=conds, reference=ref, timings=timings)
    (out / "microconditioning.json").write_text(json.dumps(result, indent=2, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
