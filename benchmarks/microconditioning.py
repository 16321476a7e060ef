"""Size and crop conditioning (paper section 2.2: Table 2, figs. 4 and 5) reproduced at toy size.

    python benchmarks/microconditioning.py --workdir runs/microconditioning   # ~40 min, 2 cores
    python benchmarks/microconditioning.py --workdir /tmp/mcq --quick         # the pieces, ~4 min

1. Trains in --workdir, each a real ``python -m sdxl_jax.train`` run (rerun: finished stages
   are skipped, an interrupted one resumes; logs in WORKDIR/logs): the tiny autoencoder on the
   study's data, then the three bases of ``experiments/microconditioning.py``, same seed, data
   order and steps: (a) ``discard`` originals under 64 px, (b) ``nocond`` (original size and crop
   zeroed), (c) ``cond``. The data: synthetic shapes, originals 16..256 px short side (small ones
   upscaled, so blurry), up to 2:1, the shape 4..26% of the axis from its border, random crops
   into one 64x64 bucket with their real coordinates (4 cached per record).
2. Samples the 72 synthetic captions x --images-per-caption (DDIM, guidance 4) with the same
   initial noise under every condition: (c) at crop (0, 0), at crop (0, L) and (L, 0) (L =
   --crop, the original being the 64 px window's centred 2:1 image, as in training), and at
   original sizes --sizes (crop (0, 0)); (b) with its zero vector; (a) at (64, 64), crop (0, 0).
   Samples are kept in OUT/samples (a rerun reuses them).
3. Measures every image (``microconditioning_measure``: the exact scorer's accuracy, cut / whole,
   margins, edge width, a feature distance to the training crops) and compares conditions on
   the same captions and noise with a paired 95% bootstrap over images.
4. Writes OUT/microconditioning.json, OUT/crop_effect.png and OUT/size_effect.png (rows:
   condition; columns: the same caption and noise) and prints Table 2 and one line per effect.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from the repository root without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import microconditioning_measure as measure  # noqa: E402

from experiments import microconditioning as study  # noqa: E402
from sdxl_jax.data import synthetic  # noqa: E402

CAPTIONS = [
    synthetic.caption_for(c, s, p)
    for c in synthetic.COLOURS
    for s in synthetic.SHAPES
    for p in synthetic.POSITIONS
]
SIZE = 64  # the bucket (tiny_square_64)
QUICK_DATA = "synthetic:288?min_side=16&max_side=256&edge=0.04-0.26"
LABELS = {"discard": "(a) discard < 64 px", "nocond": "(b) no conditioning",
          "cond": "(c) conditioned"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default="runs/microconditioning", help="training workdir")
    p.add_argument("--out", default="", help="results folder (default WORKDIR/study)")
    p.add_argument(
        "--quick", action="store_true", help="tiny budgets: checks the pieces run, not the effects"
    )
    p.add_argument("--train-steps", type=int, default=0,
                   help=f"steps per base (default {study.STEPS}; --quick 12)")  # fmt: skip
    p.add_argument("--images-per-caption", type=int, default=0,
                   help="per condition, x72 captions (default 8; --quick 1)")  # fmt: skip
    p.add_argument("--steps", type=int, default=0, help="DDIM steps (default 25; --quick 4)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4)")
    p.add_argument("--seed", type=int, default=0, help="initial noise seed (same per condition)")
    p.add_argument("--crop", type=int, default=32, help="large crop offset L in px (default 32)")
    p.add_argument("--sizes", type=int, nargs=2, default=[16, 256], metavar=("SMALL", "LARGE"),
                   help="original sides compared (default 16 256)")  # fmt: skip
    p.add_argument("--reference", type=int, default=0,
                   help="training crops for references (default 2880; --quick 144)")  # fmt: skip
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    args = p.parse_args(argv)
    q = args.quick
    args.train_steps = args.train_steps or (12 if q else study.STEPS)
    args.images_per_caption = args.images_per_caption or (1 if q else 8)
    args.steps = args.steps or (4 if q else 25)
    args.reference = args.reference or (144 if q else 2880)
    args.data = QUICK_DATA if q else study.DATA
    args.workdir = Path(args.workdir)
    args.out = Path(args.out) if args.out else args.workdir / "study"
    if min(args.train_steps, args.images_per_caption, args.steps, args.reference) < 1:
        p.error("--train-steps, --images-per-caption, --steps and --reference must be >= 1")
    if not 0 < args.crop <= SIZE or min(args.sizes) < 8:
        p.error(f"--crop must be in 1..{SIZE} and --sizes at least 8 px")
    return args


# ----------------------------------------------------------------------------- training


def train_commands(args) -> list[tuple[str, list[str]]]:
    """(stage, argv) of the autoencoder and the three bases, overrides for --quick."""
    common = [f"--workdir={args.workdir}", f"--compile_cache={args.workdir / 'xla_cache'}"]
    data = [f"--config.data.path={args.data}"]
    ae = ["--config=experiments/autoencoder.py:tiny", *data,
          *(f"--config.{kv}" for kv in study.AUTOENCODER)]  # fmt: skip
    # --quick: small batches, one checkpoint per stage and the test-size UNet (same code, half
    # the compile time: compilation is most of a quick run's time).
    small = ["--config.data.global_batch_size=8"] if args.quick else []
    micro = ["--config.model.preset=micro"] if args.quick else []
    if args.quick:
        ae += ["--config.optim.total_steps=12", "--config.optim.warmup_steps=3", *small]
    out = [("autoencoder", [*ae, *common])]
    every = args.train_steps if args.quick else max(args.train_steps // 4, 1)
    for variant in study.VARIANTS:
        argv = [f"--config=experiments/microconditioning.py:{variant}", *data, *small, *micro,
                f"--config.optim.total_steps={args.train_steps}",
                f"--config.optim.warmup_steps={min(50, args.train_steps // 4)}",
                f"--config.checkpoint.every_steps={every}"]  # fmt: skip
        out.append((f"microcond_{variant}", [*argv, *common]))
    return out


def train(args) -> dict[str, float]:
    """Run (or resume, or skip when finished) every stage; seconds per stage."""
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    seconds = {}
    for stage, argv in train_commands(args):
        t = time.perf_counter()
        log = logs / f"{stage}.log"
        print(f"train {stage} (log: {log}) ...", end=" ", flush=True, file=sys.stderr)
        with log.open("a") as f:
            rc = subprocess.run([sys.executable, "-m", "sdxl_jax.train", *argv], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT).returncode  # fmt: skip
        seconds[stage] = round(time.perf_counter() - t, 1)
        print(f"{seconds[stage]:.0f} s", file=sys.stderr, flush=True)
        if rc:
            tail = log.read_text().splitlines()[-15:]
            raise RuntimeError(f"training {stage} failed (exit {rc}); {log} ends:\n" +
                               "\n".join(tail))  # fmt: skip
    return seconds


# ----------------------------------------------------------------------------- sampling


def conditions(args) -> dict[str, list[dict]]:
    """{variant: [{name, original (h, w), crop (top, left)}]} sampled per model."""
    lc = args.crop
    cond = [dict(name="crop_0_0", original=(SIZE, SIZE), crop=(0, 0)),
            dict(name=f"crop_0_{lc}", original=(SIZE, SIZE + 2 * lc), crop=(0, lc)),
            dict(name=f"crop_{lc}_0", original=(SIZE + 2 * lc, SIZE), crop=(lc, 0))]  # fmt: skip
    cond += [dict(name=f"size_{s}", original=(s, s), crop=(0, 0)) for s in args.sizes if s != SIZE]
    return {
        "discard": [dict(name="crop_0_0", original=(SIZE, SIZE), crop=(0, 0))],
        "nocond": [dict(name="zero", original=(0, 0), crop=(0, 0))],
        "cond": cond,
    }


def sample(args) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """{variant: {condition: uint8 [N, 64, 64, 3]}}, cached in OUT/samples; seconds per model."""
    from sdxl_jax.inference import generate

    cache = args.out / "samples"
    cache.mkdir(parents=True, exist_ok=True)
    out, seconds = {}, {}
    tag = f"ipc{args.images_per_caption}_s{args.steps}_g{args.guidance:g}_seed{args.seed}"
    for variant, conds in conditions(args).items():
        t = time.perf_counter()
        out[variant], gen = {}, None
        for c in conds:
            path = cache / f"{variant}_{c['name']}_{tag}.npy"
            if path.exists():
                out[variant][c["name"]] = np.load(path)
                continue
            if gen is None:
                models = generate.check_models(args.workdir / f"microcond_{variant}" / "export")
                gen = generate.Generator(models, dtype="fp32", batch_size=144)
            request = generate.make_request(
                models, CAPTIONS, num_images=args.images_per_caption, steps=args.steps,
                guidance=args.guidance, sampler="ddim", height=SIZE, width=SIZE, seed=args.seed,
                original_size=c["original"], crop=c["crop"],
            )  # fmt: skip
            images = gen(request).images
            np.save(path, images)
            out[variant][c["name"]] = images
            print(f"  sampled {variant} {c['name']}: {len(images)} images", file=sys.stderr)
        seconds[variant] = round(time.perf_counter() - t, 1)
    return out, seconds


# ----------------------------------------------------------------------------- references


def reference(args) -> dict:
    """The training distribution: random crops of the study's data into the bucket, as the
    cache made them. Returns images, per-image measures, crop offsets and original sizes."""
    from sdxl_jax.data import buckets, images, sources

    source = sources.open_source(args.data)
    rng = np.random.default_rng(args.seed)
    imgs, offsets, shorts = [], [], []
    for i in range(min(args.reference, len(source))):
        rec = source.load(i)
        img = images.decode_rgb(rec.data)
        crop = buckets.plan_crop(img.shape[:2], (SIZE, SIZE), rng=rng)
        imgs.append(buckets.apply_crop(img, crop))
        offsets.append(max(crop.top, crop.left))
        shorts.append(min(img.shape[:2]))
    imgs = np.stack(imgs)
    decoded = roundtrip(args.workdir / "autoencoder" / "export", imgs, args.seed)
    return dict(images=imgs, values=measure.per_image(imgs, [None] * len(imgs)),
                offset=np.array(offsets), short=np.array(shorts),
                roundtrip=measure.per_image(decoded, [None] * len(imgs)))  # fmt: skip


def roundtrip(vae_path: Path, imgs: np.ndarray, seed: int, batch: int = 144) -> np.ndarray:
    """The images encoded and decoded by the study's autoencoder: the most any base trained
    on its latents can show (sharpness and cuts the VAE loses, no base can draw)."""
    import jax

    from sdxl_jax.inference import runtime

    vae = runtime.load_vae(vae_path, runtime.make_mesh(jax.devices()[:1]))
    out = []
    for i in range(0, len(imgs), batch):
        x = imgs[i : i + batch]
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), len(x))
        out.append(vae.decode(vae.encode(x, keys)))
    return np.concatenate(out)


def reference_tables(ref: dict, crop: int, key: str = "values") -> dict:
    """Cut rate of training crops by offset and edge width by original size: what the
    conditioning values meant in the data (``key="roundtrip"``: after the autoencoder)."""
    v, off, short = ref[key], ref["offset"], ref["short"]
    bands = {"0": off == 0, "1-15": (off >= 1) & (off < 16), "16-47": (off >= 16) & (off < 48),
             "48-64": off >= 48}  # fmt: skip
    cut = {k: dict(n=int(m.sum()), cut=measure.summary({"c": v["cut"][m]})["c"])
           for k, m in bands.items() if m.any()}  # fmt: skip
    size_bands = {"16-23": (16, 24), "24-47": (24, 48), "48-95": (48, 96), "96-256": (96, 257)}
    edge = {}
    for k, (lo, hi) in size_bands.items():
        m = (short >= lo) & (short < hi)
        if m.any():
            edge[k] = dict(n=int(m.sum()), edge_px=measure.summary({"e": v["edge_px"][m]})["e"])
    near = np.abs(off - crop) <= 4
    return dict(cut_by_crop_offset=cut, edge_by_original_short_side=edge,
                cut_near_large_crop=measure.summary({"c": v["cut"][near]})["c"] if near.any()
                else None, cut_all=measure.summary({"c": v["cut"]})["c"])  # fmt: skip


# ----------------------------------------------------------------------------- report


def grid(rows: list[tuple[str, np.ndarray]], columns: list[int], path: Path, scale: int = 2):
    """A PNG: one row per (label, images), the same image indices in every row."""
    from PIL import Image, ImageDraw

    tile, label_w, pad = SIZE * scale, 150, 2
    h = len(rows) * (tile + pad) + pad
    w = label_w + len(columns) * (tile + pad) + pad
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        y = pad + r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), label, fill=(0, 0, 0))
        for c, i in enumerate(columns):
            img = Image.fromarray(imgs[i]).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(img, (label_w + pad + c * (tile + pad), y))
    sheet.save(path)


def effect_line(name: str, what: str, unit: str, labels: tuple[str, str], d: dict) -> str:
    if d["n"] < 2:
        return (f"{name}: {what} not measurable at {labels[0]} vs {labels[1]} (n={d['n']} "
                "images with a shape in both)")  # fmt: skip
    scale, suffix, digits = (100, "%", 1) if unit == "%" else (1, f" {unit}", 2)

    def f(x, sign=""):
        return f"{scale * x:{sign}.{digits}f}"

    return (f"{name}: {what} at {labels[0]} {f(d['a'])}{suffix} vs at {labels[1]} "
            f"{f(d['b'])}{suffix}, difference {f(d['diff'], '+')} [{f(d['lo'], '+')}, "
            f"{f(d['hi'], '+')}] (95% CI, n={d['n']})")  # fmt: skip


def report(args, samples: dict, ref: dict) -> dict:
    """Table 2 rows, the effects with paired bootstrap intervals, the grids."""
    prompts = [c for c in CAPTIONS for _ in range(args.images_per_caption)]
    values = {v: {c: measure.per_image(imgs, prompts) for c, imgs in conds.items()}
              for v, conds in samples.items()}  # fmt: skip
    default = {"discard": "crop_0_0", "nocond": "zero", "cond": "crop_0_0"}
    table = {}
    for v, c in default.items():
        row = measure.summary(values[v][c])
        row["all_ci"] = measure.mean_interval(values[v][c]["all"], resamples=args.resamples)
        row["fd"] = round(measure.feature_distance(samples[v][c], ref["images"]), 3)
        table[v] = row
    boot = dict(resamples=args.resamples)
    lc, (small, large) = args.crop, args.sizes
    c = values["cond"]

    def size_key(s):
        return "crop_0_0" if s == SIZE else f"size_{s}"

    effects = {
        "crop_left": measure.paired_difference(c["crop_0_0"]["cut"], c[f"crop_0_{lc}"]["cut"],
                                               **boot),
        "crop_top": measure.paired_difference(c["crop_0_0"]["cut"], c[f"crop_{lc}_0"]["cut"],
                                              **boot),
        "offset_x": measure.paired_difference(c["crop_0_0"]["margin_x"],
                                              c[f"crop_0_{lc}"]["margin_x"], **boot),
        "offset_y": measure.paired_difference(c["crop_0_0"]["margin_y"],
                                              c[f"crop_{lc}_0"]["margin_y"], **boot),
        "size": measure.paired_difference(c[size_key(small)]["edge_px"],
                                          c[size_key(large)]["edge_px"], **boot),
        "baseline_cut": measure.paired_difference(c["crop_0_0"]["cut"],
                                                  values["nocond"]["zero"]["cut"], **boot),
    }  # fmt: skip
    lines = [
        effect_line("crop effect", "cut rate", "%", ("(0,0)", f"(0,{lc})"), effects["crop_left"]),
        effect_line("crop effect", "cut rate", "%", ("(0,0)", f"({lc},0)"), effects["crop_top"]),
        effect_line("offset effect", "left/right margin", "px", ("(0,0)", f"(0,{lc})"),
                    effects["offset_x"]),
        effect_line("offset effect", "top/bottom margin", "px", ("(0,0)", f"({lc},0)"),
                    effects["offset_y"]),
        effect_line("size effect", "edge width", "px", (f"size {small}", f"size {large}"),
                    effects["size"]),
        effect_line("baseline", "cut rate", "%", ("(c) at (0,0)", "(b) unconditioned"),
                    effects["baseline_cut"]),
    ]  # fmt: skip
    columns = [k * args.images_per_caption for k in range(0, len(CAPTIONS), 6)]
    crop_rows = [("(c) crop (0,0)", samples["cond"]["crop_0_0"]),
                 (f"(c) crop (0,{lc})", samples["cond"][f"crop_0_{lc}"]),
                 (f"(c) crop ({lc},0)", samples["cond"][f"crop_{lc}_0"]),
                 ("(b) no conditioning", samples["nocond"]["zero"])]  # fmt: skip
    grid(crop_rows, columns, args.out / "crop_effect.png")
    sizes = sorted({small, SIZE, large})
    grid([(f"(c) original {s}x{s}", samples["cond"][size_key(s)]) for s in sizes],
         columns, args.out / "size_effect.png")  # fmt: skip
    conds = {v: {c: measure.summary(x) for c, x in vs.items()} for v, vs in values.items()}
    return dict(table2=table, effects=effects, lines=lines, conditions=conds,
                reference=reference_tables(ref, lc),
                reference_roundtrip=reference_tables(ref, lc, "roundtrip"))  # fmt: skip


def print_table(result: dict) -> None:
    print(f"{'model':<22}{'colour':>8}{'shape':>8}{'pos':>8}{'all':>8}  all 95% CI"
          f"{'cut':>7}{'edge px':>9}{'FD':>8}")  # fmt: skip
    for v, r in result["table2"].items():
        pct = "".join(f"{100 * r[k]:7.1f}%" for k in ("colour", "shape", "position", "all"))
        lo, hi = r["all_ci"]
        print(f"{LABELS[v]:<22}{pct}  [{100 * lo:4.1f}, {100 * hi:4.1f}]"
              f"{100 * r['cut']:6.1f}%{r['edge_px']:9.2f}{r['fd']:8.2f}")  # fmt: skip
    for key, what in (
        ("reference", "training crops"),
        ("reference_roundtrip", "training crops through the autoencoder"),
    ):
        ref = result[key]
        cut = ", ".join(f"{k} px {100 * r['cut']:.0f}% (n={r['n']})"
                        for k, r in ref["cut_by_crop_offset"].items())  # fmt: skip
        edge = ", ".join(f"{k} px {r['edge_px']:.2f} (n={r['n']})"
                         for k, r in ref["edge_by_original_short_side"].items())  # fmt: skip
        print(f"{what}: cut rate {100 * ref['cut_all']:.1f}% overall; by crop offset {cut}")
        print(f"{what}: edge width by original short side {edge}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    timings = {}
    try:
        timings["train_s"] = train(args)
        samples, timings["sample_s"] = sample(args)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = time.perf_counter()
    ref = reference(args)
    result = report(args, samples, ref)
    timings["measure_s"] = round(time.perf_counter() - t, 1)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    print_table(result)
    for line in result["lines"]:
        print(line)
    print(f"time: {timings['total_s'] / 60:.1f} min (train {sum(timings['train_s'].values()):.0f}"
          f" s, sample {sum(timings['sample_s'].values()):.0f} s, measure "
          f"{timings['measure_s']:.0f} s); results in {args.out}")  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result.update(settings=settings, timings=timings)
    (args.out / "microconditioning.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
