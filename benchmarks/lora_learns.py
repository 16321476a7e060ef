"""Does a LoRA teach the tiny base a concept it has never seen, without forgetting the rest?

python benchmarks/lora_learns.py --workdir /tmp/lora_base [--steps 150] [--images 48] \
    [--prior none|base|data] [--rank R] [--cond-dropout P] [--seed S] [--per-caption K]

Needs the tiny curriculum's multi-aspect base in ``--workdir`` (``base_1024``: run
``python -m sdxl_jax.train --workdir DIR`` or its first stages). The concept is a new word,
"blorp", that no base caption holds: ``--images`` renders of "a blorp <shape> in the
<position>" drawn in purple (``synthetic:N?colour=purple&word=blorp``). The DreamBooth stage
(``experiments/dreambooth.py:tiny``: a rank-8 LoRA on attention + feed-forward) trains on
them for ``--steps`` steps, ``--prior base`` with prior preservation (class images: the base's
own samples of the 72 original captions, 2 each, loss weight 1), ``--prior data`` with
renders of the original captions as regularisation images instead (``dreambooth.class_data=
synthetic:144?seed=11``, kohya's reg images: the base's kind of training data), ``--prior
none`` without.
Then the base alone and the base with the LoRA sample the 12 blorp captions and the 72
original captions with the same initial noise (DDIM 30 steps, guidance 7 or ``--guidance``,
64 px), scored by the exact scorer: for blorp captions, the concept appears when the shape is
purple (and, for "all", the shape and position are right); for the original captions,
all-three. ``--word`` names another new word, ``--lr`` / ``--groups`` / ``--offset-noise``
change the training and ``--lora-scale`` the sampling. The last line gives the old captions'
all-three change from the base to base + LoRA with a paired 95% bootstrap interval (image i of
both from the same caption and noise). The base's samples are kept in the workdir for reruns.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from microconditioning_measure import paired_difference

from sdxl_jax.data import synthetic

WORD = "blorp"
COLOUR = "purple"


def original_captions() -> list[str]:
    return [
        synthetic.caption_for(c, s, p)
        for c in synthetic.COLOURS
        for s in synthetic.SHAPES
        for p in synthetic.POSITIONS
    ]


def concept_score(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Fraction of blorp samples with a purple shape; and with shape and position right too."""
    colour = shape_pos = 0
    for image, caption in zip(images, captions, strict=True):
        got = synthetic.classify(np.asarray(image))
        want = caption.replace(f"a {WORD} ", f"a {COLOUR} ")
        _, shape, position = synthetic.parse_caption(want)
        colour += got[0] == COLOUR
        shape_pos += got[0] == COLOUR and got[1] == shape and got[2] == position
    n = len(captions)
    return {"concept_colour": colour / n, "concept_all": shape_pos / n}


def old_scores(images: np.ndarray, captions: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """The exact scorer's accuracy of the old captions' samples, and each sample's all-three
    (0/1, for the paired interval): every image scored once."""
    scores = [synthetic.score(np.asarray(im), c) for im, c in zip(images, captions, strict=True)]
    means = {f"old_{k}": float(np.mean([s[k] for s in scores])) for k in scores[0]}
    return means, np.array([s["all"] for s in scores], float)


def sample(
    base: Path,
    lora: Path | None,
    captions: list[str],
    per_caption: int,
    scale: float = 1.0,
    guidance: float = 7.0,
) -> np.ndarray:
    from sdxl_jax.inference import generate

    loras = [(str(lora), scale)] if lora else []
    result = generate.generate(
        captions, base, loras=loras, num_images=per_caption, steps=30, guidance=guidance,
        sampler="ddim", height=64, width=64, seed=1234, batch_size=48,
    )  # fmt: skip
    return result.images


def class_data(args: argparse.Namespace) -> str:
    """The base's samples (a folder, generated once, shared by the runs) or, for ``--prior
    data``, renders of the original captions as a source (all 72 captions equally)."""
    if args.prior == "data":
        return f"synthetic:{args.class_images}?seed=11"
    name = "blorp_class_images"
    if args.class_guidance != 7.0:
        name += f"_g{args.class_guidance:g}"
    return str(args.workdir / name)


def train(args: argparse.Namespace) -> Path:
    from experiments import dreambooth
    from sdxl_jax.train.loop import run_stage

    c = dreambooth.get_config("tiny")
    workdir, images, steps, prior, lr = (
        args.workdir, args.images, args.steps, args.prior, args.lr,
    )  # fmt: skip
    c.stage = f"{WORD}_{prior}_{images}_{steps}_lr{lr:g}_{args.groups.replace(',', '_')}"
    c.stage += f"_offset{args.offset_noise:g}" if args.offset_noise else ""
    c.stage += f"_r{args.rank}" if args.rank != c.lora.rank else ""
    c.stage += f"_cd{args.cond_dropout:g}" if args.cond_dropout != c.step.cond_dropout else ""
    c.stage += f"_seed{args.seed}" if args.seed else ""
    c.lora.rank = args.rank
    c.step.cond_dropout = args.cond_dropout
    c.seed = args.seed
    c.lora.groups = args.groups
    c.step.offset_noise = args.offset_noise
    c.dreambooth.instance_data = f"synthetic:{images}?seed=5&colour={COLOUR}&word={WORD}"
    c.dreambooth.prior_loss_weight = 0.0 if prior == "none" else 1.0
    c.dreambooth.num_class_images = args.class_images
    c.stage += f"_cls{args.class_images}" if args.class_images != 144 else ""
    c.stage += f"_cg{args.class_guidance:g}" if args.class_guidance != 7.0 else ""
    c.dreambooth.class_guidance = args.class_guidance
    c.dreambooth.class_data = class_data(args)
    c.optim.lr = lr
    c.optim.total_steps = steps
    c.checkpoint.every_steps = steps
    result = run_stage(c, workdir, quiet=True)
    return Path(result.export) / "lora.safetensors"


def sample_cached(args, base: Path, lora: Path | None, captions: list[str], k: int):
    """The base's samples are the same for every run with the same settings: kept in the
    workdir."""
    key = f"base_samples_{WORD}_{k}_g{args.guidance:g}.npy"
    path = args.workdir / key
    if lora is None and path.exists():
        return np.load(path)
    images = sample(base, lora, captions, k, args.lora_scale, args.guidance)
    if lora is None:
        np.save(path, images)
    return images


def main() -> None:
    global WORD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--per-caption", type=int, default=2)
    ap.add_argument(
        "--prior", choices=("none", "base", "data"), default="none",
        help="regularisation images: none, the base's samples (DreamBooth's prior "
        "preservation) or renders of the original captions (kohya's reg images)",
    )  # fmt: skip
    ap.add_argument("--rank", type=int, default=8, help="the LoRA's rank")
    ap.add_argument("--cond-dropout", type=float, default=0.1, help="caption dropout (CFG)")
    ap.add_argument("--seed", type=int, default=0, help="the training's seed")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--offset-noise", type=float, default=0.0)
    ap.add_argument("--class-images", type=int, default=144, help="prior images (2 per caption)")
    ap.add_argument("--guidance", type=float, default=7.0, help="sampling guidance")
    ap.add_argument(
        "--class-guidance", type=float, default=7.0, help="guidance of --prior base's images"
    )
    ap.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's scale in sampling")
    ap.add_argument("--groups", default="attn,ff", help="the LoRA's layer groups")
    ap.add_argument("--word", default=WORD, help="the new word (default: blorp, 4 tokens)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    WORD = args.word
    base = args.workdir / "base_1024" / "export"
    if not base.exists():
        raise SystemExit(f"{base} is missing: train the tiny curriculum's base first")
    if args.prior == "base":  # the class images first (not timed with the training)
        from experiments import dreambooth
        from sdxl_jax.train import dreambooth as dreambooth_lib

        db = dreambooth.get_config("tiny").dreambooth
        db.num_class_images = args.class_images
        db.class_guidance = args.class_guidance
        t = time.perf_counter()
        made = dreambooth_lib.generate_class_images(db, base, Path(class_data(args)))
        print(f"class images: {made} generated in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    lora = train(args)
    train_s = time.perf_counter() - t

    new = [f"a {WORD} {s} in the {p}" for s in synthetic.SHAPES for p in synthetic.POSITIONS]
    old = original_captions()
    k = args.per_caption
    rows, old_all = {}, {}
    old_captions = [c for c in old for _ in range(k)]
    for name, adapter in (("base", None), ("base + LoRA", lora)):
        images = sample_cached(args, base, adapter, new + old, k)
        n_new = len(new) * k
        means, old_all[name] = old_scores(images[n_new:], old_captions)
        rows[name] = {**concept_score(images[:n_new], [c for c in new for _ in range(k)]), **means}
    drop = paired_difference(old_all["base"], old_all["base + LoRA"])
    report = {"train_s": round(train_s, 1), "steps": args.steps, "images": args.images,
              "prior": args.prior, "lr": args.lr, "word": WORD,
              "groups": args.groups, "offset_noise": args.offset_noise,
              "lora_scale": args.lora_scale, "guidance": args.guidance,
              "class_images": args.class_images, "rank": args.rank,
              "class_guidance": args.class_guidance,
              "cond_dropout": args.cond_dropout, "seed": args.seed, "rows": rows,
              "old_all_change": {k: round(100 * v, 1) if k != "n" else v
                                 for k, v in drop.items()}}  # fmt: skip
    print(json.dumps(report, indent=2))
    d = report["old_all_change"]
    print(f"old all-three: {d['a']}% -> {d['b']}%, change {d['diff']:+.1f} "
          f"[{d['lo']:+.1f}, {d['hi']:+.1f}] (95% CI, paired, n={d['n']}); concept "
          f"{100 * rows['base + LoRA']['concept_colour']:.1f}%")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
