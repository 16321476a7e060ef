"""Does a LoRA teach the tiny base a concept it has never seen, without forgetting the rest?

python benchmarks/lora_learns.py --workdir /tmp/lora_base [--steps 150] [--images 48] \
    [--prior none|base]

Needs the tiny curriculum's multi-aspect base in ``--workdir`` (``base_1024``: run
``python -m sdxl_jax.train --workdir DIR`` or its first stages). The concept is a new word,
"blorp", that no base caption holds: ``--images`` renders of "a blorp <shape> in the
<position>" drawn in purple (``synthetic:N?colour=purple&word=blorp``). The DreamBooth stage
(``experiments/dreambooth.py:tiny``: a rank-8 LoRA on attention + feed-forward) trains on
them for ``--steps`` steps, ``--prior base`` with prior preservation (class images: the base's
own samples of the 72 original captions, 2 each, loss weight 1), ``--prior none`` without.
Then the base alone and the base with the LoRA sample the 12 blorp captions and the 72
original captions with the same initial noise (DDIM 30 steps, guidance 7 or ``--guidance``,
64 px), scored by the exact scorer: for blorp captions, the concept appears when the shape is
purple (and, for "all", the shape and position are right); for the original captions,
all-three. ``--word`` names another new word, ``--lr`` / ``--groups`` / ``--offset-noise``
change the training and ``--lora-scale`` the sampling.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

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


def train(args: argparse.Namespace) -> Path:
    from experiments import dreambooth
    from sdxl_jax.train.loop import run_stage

    c = dreambooth.get_config("tiny")
    workdir, images, steps, prior, lr = (
        args.workdir, args.images, args.steps, args.prior, args.lr,
    )  # fmt: skip
    c.stage = f"{WORD}_{prior}_{images}_{steps}_lr{lr:g}_{args.groups.replace(',', '_')}"
    c.stage += f"_offset{args.offset_noise:g}" if args.offset_noise else ""
    c.lora.groups = args.groups
    c.step.offset_noise = args.offset_noise
    c.dreambooth.instance_data = f"synthetic:{images}?seed=5&colour={COLOUR}&word={WORD}"
    c.dreambooth.prior_loss_weight = 1.0 if prior == "base" else 0.0
    c.dreambooth.num_class_images = args.class_images
    c.stage += f"_cls{args.class_images}" if args.class_images != 144 else ""
    c.dreambooth.class_data = str(workdir / "blorp_class_images")  # shared by the runs
    c.optim.lr = lr
    c.optim.total_steps = steps
    c.checkpoint.every_steps = steps
    result = run_stage(c, workdir, quiet=True)
    return Path(result.export) / "lora.safetensors"


def main() -> None:
    global WORD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--per-caption", type=int, default=2)
    ap.add_argument("--prior", choices=("none", "base"), default="none")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--offset-noise", type=float, default=0.0)
    ap.add_argument("--class-images", type=int, default=144, help="prior images (2 per caption)")
    ap.add_argument("--guidance", type=float, default=7.0, help="sampling guidance")
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
        t = time.perf_counter()
        made = dreambooth_lib.generate_class_images(db, base, args.workdir / "blorp_class_images")
        print(f"class images: {made} generated in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    lora = train(args)
    train_s = time.perf_counter() - t

    new = [f"a {WORD} {s} in the {p}" for s in synthetic.SHAPES for p in synthetic.POSITIONS]
    old = original_captions()
    k = args.per_caption
    rows = {}
    for name, adapter in (("base", None), ("base + LoRA", lora)):
        images = sample(base, adapter, new + old, k, args.lora_scale, args.guidance)
        n_new = len(new) * k
        rows[name] = {
            **concept_score(images[:n_new], [c for c in new for _ in range(k)]),
            **{
                f"old_{key}": v
                for key, v in synthetic.accuracy(
                    images[n_new:], [c for c in old for _ in range(k)]
                ).items()
            },
        }
    report = {"train_s": round(train_s, 1), "steps": args.steps, "images": args.images,
              "prior": args.prior, "lr": args.lr, "word": WORD,
              "groups": args.groups, "offset_noise": args.offset_noise,
              "lora_scale": args.lora_scale, "guidance": args.guidance,
              "class_images": args.class_images, "rows": rows}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
