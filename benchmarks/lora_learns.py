"""Does a LoRA teach the tiny base a concept it has never seen, without forgetting the rest?

python benchmarks/lora_learns.py --workdir /tmp/lora_base [--steps 150] [--images 48]

Needs the tiny curriculum's multi-aspect base in ``--workdir`` (``base_1024``: run
``python -m sdxl_jax.train --workdir DIR`` or its first three stages). The concept is a new word,
"blorp", that no base caption holds: ``--images`` renders of "a blorp <shape> in the <position>"
drawn in purple (the synthetic renderer, sizes 32..96 px). A LoRA stage
(``experiments/lora.py:tiny``, rank 8 on attention + feed-forward) trains on them for
``--steps`` steps; then the base alone and the base with the LoRA sample the 12 blorp captions
and the 72 original captions with the same initial noise (DDIM 30 steps, guidance 7, 64 px),
scored by the exact scorer: for blorp captions, the concept appears when the shape is purple
(and the shape and position are right); for the original captions, all-three.

``--prior`` adds images of the original captions to the LoRA's data, against the drift toward
the new concept: ``base`` (DreamBooth's prior preservation: the base's own samples of the 72
captions, generated once, loss weight 1), ``renders`` (regularisation images: renders of the
72 captions, kohya's reg folder), ``none`` (default).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_jax.data import synthetic

WORD = "blorp"
COLOUR = "purple"


def concept_folder(out: Path, n: int, seed: int = 0) -> Path:
    """``n`` renders of "a blorp <shape> in the <position>" (purple), PNG + .txt captions."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    combos = [(s, p) for s in synthetic.SHAPES for p in synthetic.POSITIONS]
    for i in range(n):
        shape, position = combos[i % len(combos)]
        h, w = (int(rng.integers(32, 97)) for _ in range(2))
        image = synthetic.render(COLOUR, shape, position, h, w, rng=rng)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        (out / f"{i:04d}.png").write_bytes(buf.getvalue())
        (out / f"{i:04d}.txt").write_text(f"a {WORD} {shape} in the {position}")
    return out


def add_prior(folder: Path, kind: str, base: Path, per_caption: int = 2) -> None:
    """Class / regularisation images of the original captions into the concept folder."""
    if kind == "none":
        return
    old = original_captions()
    if kind == "renders":
        items = [(ex["image"], ex["caption"]) for ex in synthetic.examples(72 * per_caption, 7)]
    else:
        from sdxl_jax.inference import generate

        images = generate.generate(
            old, base, num_images=per_caption, steps=30, guidance=7.0, sampler="ddim",
            height=64, width=64, seed=99, batch_size=48,
        ).images  # fmt: skip
        items = []
        captions = [c for c in old for _ in range(per_caption)]
        for image, caption in zip(images, captions, strict=True):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            items.append((buf.getvalue(), caption))
    for i, (png, caption) in enumerate(items):
        (folder / f"prior_{i:04d}.png").write_bytes(png)
        (folder / f"prior_{i:04d}.txt").write_text(caption)


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
        want = caption.replace(WORD, COLOUR)
        _, shape, position = synthetic.parse_caption(want)
        colour += got[0] == COLOUR
        shape_pos += got[0] == COLOUR and got[1] == shape and got[2] == position
    n = len(captions)
    return {"concept_colour": colour / n, "concept_all": shape_pos / n}


def sample(base: Path, lora: Path | None, captions: list[str], per_caption: int) -> np.ndarray:
    from sdxl_jax.inference import generate

    loras = [(str(lora), 1.0)] if lora else []
    result = generate.generate(
        captions, base, loras=loras, num_images=per_caption, steps=30, guidance=7.0,
        sampler="ddim", height=64, width=64, seed=1234, batch_size=48,
    )  # fmt: skip
    return result.images


def prepared(folder: Path, out: Path) -> Path:
    """The concept folder as a dataset the trainer reads (the tiny stages' bucket set)."""
    from sdxl_jax.data import prepare

    if not (out / "sdxl_index.npz").exists():
        args = [
            "--source",
            f"folder:{folder}",
            "--out",
            str(out),
            "--bucket-sets",
            "tiny_aspect_64",
            "--min-side",
            "16",
            "--no-progress",
            "--workers",
            "1",
        ]
        prepare.main(args)
    return out


def train_lora(workdir: Path, data: Path, steps: int, stage: str) -> Path:
    from experiments import lora as lora_exp
    from sdxl_jax.train.loop import run_stage

    c = lora_exp.get_config("tiny")
    c.stage = stage
    c.data.path = str(data)
    c.data.global_batch_size = 8
    c.data.cache = "auto"
    c.optim.total_steps = steps
    c.log.sample_every_steps = 0
    c.checkpoint.every_steps = steps
    result = run_stage(c, workdir, quiet=True)
    return Path(result.export) / "lora.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--per-caption", type=int, default=2)
    ap.add_argument("--prior", choices=("none", "base", "renders"), default="none")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    base = args.workdir / "base_1024" / "export"
    if not base.exists():
        raise SystemExit(f"{base} is missing: train the tiny curriculum's base first")
    tag = "" if args.prior == "none" else f"_{args.prior}"
    folder = concept_folder(args.workdir / f"blorp_images{tag}", args.images)
    add_prior(folder, args.prior, base)
    data = prepared(folder, args.workdir / f"blorp_data{tag}")
    t = time.perf_counter()
    lora = train_lora(args.workdir, data, args.steps, f"lora_blorp{tag}")
    train_s = time.perf_counter() - t

    new = [f"a {WORD} {s} in the {p}" for s in synthetic.SHAPES for p in synthetic.POSITIONS]
    old = original_captions()
    k = args.per_caption
    rows = {}
    for name, adapter in (("base", None), ("base + LoRA", lora)):
        images = sample(base, adapter, new + old, k)
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
              "prior": args.prior, "rows": rows}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
