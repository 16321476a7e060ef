"""Generate images with an SDXL base (and optionally a refiner): ``python -m sdxl_jax.sample``.

Examples:
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --prompt "a red fox in snow" --out out/
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --refiner sdxl-refiner/ \\
      --prompts-file prompts.txt --num-images 4 --sampler dpmpp_2m --karras --out out/
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --init-image cat.png --strength 0.3 \\
      --prompt "a cat, oil painting" --out out/

Writes one PNG per image (its settings in a PNG text chunk), grid.png and manifest.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.diffusion.schedule import KARRAS_SAMPLERS, SAMPLERS, SPACINGS
from sdxl_jax.inference.generate import DTYPES, Models, Request, UsageError

# A manifest entry's settings, in order (then "file").
RECORD_KEYS = (
    "index", "prompt", "negative_prompt", "image_of_prompt", "seed", "noise", "height", "width",
    "steps", "sampler", "karras", "guidance", "checkpoint", "refiner", "handoff", "init_image",
    "strength",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", required=True,
                   help="base: diffusers folder or .safetensors (gs://... is fetched to "
                   "$SDXL_LOCAL_DIR first, like --refiner and --vae)")  # fmt: skip
    g.add_argument("--refiner", help="refiner checkpoint; continues the base after --handoff")
    g.add_argument("--vae", help="a different VAE (diffusers folder or single file)")
    g.add_argument("--tokenizers", help="folder with tokenizer/ and tokenizer_2/ (single files)")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="UNet and text encoder weights and compute (auto: bf16 on GPU/TPU, fp32 on CPU); "
        "the VAE always runs in fp32",
    )
    g = p.add_argument_group("prompts")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help="a text file, one prompt per line")
    g.add_argument(
        "--negative-prompt",
        help="default: none (the base zeroes its negative conditioning, as SDXL does)",
    )
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: model's, 1024)")
    g.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: model's, 1024)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    g.add_argument("--guidance", type=float, default=5.0, help="CFG scale; 1 = off (default 5)")
    g.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="default: the checkpoint's scheduler (SDXL ships Euler); the paper used ddim",
    )
    g.add_argument(
        "--karras", action="store_true", help=f"Karras sigmas (for {', '.join(KARRAS_SAMPLERS)})"
    )
    g.add_argument("--spacing", choices=SPACINGS, help="timestep spacing (default: checkpoint's)")
    g.add_argument("--seed", type=int, default=0, help="image k uses noise fold_in(seed, k)")
    g.add_argument("--noise", help="initial latents .npy, float32 [N, 4, H/8, W/8] (diffusers)")
    g.add_argument(
        "--handoff",
        type=float,
        default=0.8,
        help="fraction of the noise schedule the base denoises before the refiner (0.8: t=200)",
    )
    g.add_argument(
        "--init-image",
        help="image-to-image: start from this image (resized to --height/--width if given, "
        "else cut down to a multiple of 8)",
    )
    g.add_argument("--strength", type=float, default=0.3, help="img2img noise strength (0.3)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--batch-size", type=int, help="images per compiled call (default: devices)")
    g.add_argument("--no-grid", action="store_true", help="skip grid.png")
    g.add_argument(
        "--vae-tile",
        type=int,
        default=192,
        help="decode in overlapping tiles of this many latents when larger (0: never)",
    )
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts_file)
    if not path.exists():
        raise UsageError(f"--prompts-file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts-file {path} holds no prompts (one per line)")
    return prompts


def read_image(path: str, height: int | None, width: int | None) -> np.ndarray:
    """RGB uint8 [H, W, 3], EXIF-rotated, alpha over white, resized to (height, width)."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(Image.open(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"--init-image {path}: cannot read it as an image ({e})") from e
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    img = img.convert("RGB")
    w, h = img.size
    size = (width or w // 8 * 8, height or h // 8 * 8)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(img, np.uint8)


@dataclasses.dataclass(frozen=True)
class Job:
    """The command line, checked: the models to load and the request to run."""

    models: Models
    request: Request


def validate(args: argparse.Namespace) -> Job:
    """Everything checkable from arguments and configs, before weights load or code compiles."""
    from sdxl_jax.inference.generate import check_models, make_request

    prompts = read_prompts(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    models = check_models(
        args.checkpoint, refiner=args.refiner, vae=args.vae, tokenizers=args.tokenizers
    )
    image = None
    if args.init_image:
        if not Path(args.init_image).exists():
            raise UsageError(f"--init-image {args.init_image} does not exist")
        image = read_image(args.init_image, args.height, args.width)
    noise = np.load(args.noise) if args.noise else None
    try:
        request = make_request(
            models, prompts, negative_prompt=args.negative_prompt, num_images=args.num_images,
            height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
            sampler=args.sampler, karras=args.karras, spacing=args.spacing, seed=args.seed,
            noise=noise, handoff=args.handoff, init_image=image, strength=args.strength,
        )  # fmt: skip
    except UsageError as e:
        if str(e).startswith("--noise is"):  # name the file
            raise UsageError(f"--noise {args.noise}{str(e)[len('--noise') :]}") from e
        raise
    return Job(models, request)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate, load, generate, write; returns the manifest."""
    t_start = time.perf_counter()
    job = validate(args)
    origin = getattr(args, "origin", {})  # set by main for gs:// checkpoints

    import jax.numpy as jnp

    from sdxl_jax.inference.generate import Generator
    from sdxl_jax.inference.outputs import ImageFolder

    gen = Generator(
        job.models, dtype=args.dtype, batch_size=args.batch_size, vae_tile=args.vae_tile,
        progress=True,
    )  # fmt: skip
    folder = ImageFolder(args.out, grid=not args.no_grid)
    # The library's settings of each image, plus where noise, images and weights came from.
    paths = dict(
        noise=args.noise, init_image=args.init_image,
        checkpoint=origin.get("checkpoint", str(args.checkpoint)),
        refiner=origin.get("refiner", args.refiner),
    )  # fmt: skip
    batch_s = []
    for batch in gen.batches(job.request):
        for img, rec in zip(batch.images, batch.records, strict=True):
            folder.write(img, {k: paths[k] if k in paths else rec[k] for k in RECORD_KEYS})
        batch_s.append(batch.seconds)
    return folder.finish(
        settings={k: val for k, val in vars(args).items()},
        devices=[str(d) for d in gen.mesh.devices.flat],
        dtype=str(jnp.dtype(gen.dtype)),
        timings=gen.timings(batch_s, t_start),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sdxl_jax import workdir

    args.origin = {}  # gs://... -> a copy on this machine's disk; images record the URL
    try:
        workdir.local_only(args.out, "--out")
        for name in ("checkpoint", "refiner", "vae"):
            value = getattr(args, name)
            if value and workdir.is_remote(value):
                args.origin[name] = value
                setattr(args, name, str(workdir.fetch(value)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        manifest = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = manifest["timings"]
    print(
        f"wrote {len(manifest['images'])} images to {args.out} "
        f"(load {t['load_s']:.1f} s, first batch {t['first_batch_s']:.1f} s incl. compile, "
        f"{t['seconds_per_image']:.2f} s/image after)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
