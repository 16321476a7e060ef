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
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_jax.diffusion.schedule import KARRAS_SAMPLERS, SAMPLERS, SPACINGS

SCHEDULER_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}


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
        choices=("auto", "fp32", "bf16", "fp16"),
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


class UsageError(ValueError):
    """Bad arguments: reported in one line before anything loads or compiles."""


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


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checkable from arguments and configs, before weights load or code compiles."""
    from sdxl_jax.data.buckets import SDXL_BUCKETS
    from sdxl_jax.diffusion import pipeline
    from sdxl_jax.diffusion.schedule import plan

    prompts = read_prompts(args)
    if args.num_images < 1:
        raise UsageError("--num-images must be at least 1")
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.guidance < 0:
        raise UsageError("--guidance must be >= 0 (1 turns guidance off)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    try:
        base = pipeline.check_stage(args.checkpoint, need_vae=args.vae is None)
        refiner = pipeline.check_stage(args.refiner, need_vae=False) if args.refiner else None
        vae_cfg = pipeline.check_vae(args.vae or args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from e
    if base.role == "refiner" and not args.init_image:
        raise UsageError(
            f"--checkpoint {args.checkpoint} is an SDXL refiner: pass a base as --checkpoint "
            f"and this as --refiner, or give --init-image to refine an image with it"
        )
    if refiner is not None and refiner.role != "refiner":
        raise UsageError(f"--refiner {args.refiner} is an SDXL base, not a refiner")
    if refiner is not None and not 0 < args.handoff < 1:
        raise UsageError(f"--handoff must be in (0, 1), got {args.handoff}")

    factor = vae_cfg.downscale
    default = base.configs["unet"].sample_size * factor
    image = None
    if args.init_image:
        if not Path(args.init_image).exists():
            raise UsageError(f"--init-image {args.init_image} does not exist")
        image = read_image(args.init_image, args.height, args.width)
        height, width = image.shape[:2]
    else:
        height, width = args.height or default, args.width or default
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % factor:
            raise UsageError(
                f"--{name} {v} is not a positive multiple of {factor} (the VAE's downscale); "
                f"try {max(factor, v // factor * factor)}"
            )
    if (height, width) not in SDXL_BUCKETS and base.configs["unet"].sample_size == 128:
        warnings.warn(
            f"{height}x{width} is not one of SDXL's training sizes (e.g. 1024x1024, 832x1216, "
            f"1216x832); quality may suffer",
            stacklevel=2,
        )

    sampler = args.sampler or default_sampler(base.path)
    n_images = len(prompts) * args.num_images
    # The checkpoint's scheduler may ask for Karras sigmas (diffusers honours it; so do we).
    karras = args.karras or (base.schedule.use_karras_sigmas and sampler in KARRAS_SAMPLERS)
    kw = dict(spacing=args.spacing, karras=karras)
    try:
        strength = args.strength if image is not None else None
        end = args.handoff if refiner else None
        plans = {
            "base": plan(
                base.schedule, sampler, args.steps, strength=strength, denoising_end=end, **kw
            )
        }
        if refiner:
            plans["refiner"] = plan(
                refiner.schedule, sampler, args.steps, denoising_start=args.handoff, **kw
            )
    except ValueError as e:
        raise UsageError(str(e)) from e

    latent_c = base.configs["unet"].in_channels
    noise = None
    if args.noise:
        noise = np.load(args.noise)
        want = (n_images, latent_c, height // factor, width // factor)
        if noise.shape != want or noise.dtype != np.float32:
            raise UsageError(
                f"--noise {args.noise} is {noise.dtype} {list(noise.shape)}; expected float32 "
                f"{list(want)} ([images, channels, height/{factor}, width/{factor}])"
            )
    return dict(
        prompts=prompts,
        base=base,
        refiner=refiner,
        height=height,
        width=width,
        factor=factor,
        sampler=sampler,
        karras=karras,
        plans=plans,
        image=image,
        noise=noise,
        n_images=n_images,
    )


def default_sampler(path: Path) -> str:
    cfg = Path(path) / "scheduler" / "scheduler_config.json"
    if cfg.exists():
        name = json.loads(cfg.read_text()).get("_class_name")
        return SCHEDULER_SAMPLERS.get(name, "euler")
    return "euler"


def png_info(params: dict[str, Any]) -> Any:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    text = (
        f"{params['prompt']}\nNegative prompt: {params['negative_prompt'] or ''}\n"
        f"Steps: {params['steps']}, Sampler: {params['sampler']}, CFG scale: {params['guidance']}, "
        f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}"
    )
    info.add_text("parameters", text)
    info.add_text("sdxl_jax", json.dumps(params))
    return info


def contact_sheet(images: list[np.ndarray], max_side: int = 256) -> np.ndarray:
    """Images laid out on a near-square grid, each shrunk to at most ``max_side``."""
    from PIL import Image

    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    h, w = images[0].shape[:2]
    s = min(1.0, max_side / max(h, w))
    th, tw = max(1, int(h * s)), max(1, int(w * s))
    sheet = np.full((rows * th, cols * tw, 3), 255, np.uint8)
    for i, img in enumerate(images):
        tile = np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.LANCZOS))
        r, c = divmod(i, cols)
        sheet[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tile
    return sheet


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate, load, generate, write; returns the manifest."""
    t_start = time.perf_counter()
    v = validate(args)
    origin = getattr(args, "origin", {})  # set by main for gs:// checkpoints

    import jax
    import jax.numpy as jnp
    from PIL import Image
    from tqdm import tqdm

    from sdxl_jax.diffusion import pipeline

    on_cpu = jax.default_backend() == "cpu"
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}.get(
        args.dtype, jnp.float32 if on_cpu else jnp.bfloat16
    )
    mesh = pipeline.make_mesh()
    n_dev = mesh.devices.size
    batch = pipeline.padded(args.batch_size or n_dev, n_dev)

    t0 = time.perf_counter()
    base = pipeline.StageRunner(
        pipeline.load_stage(v["base"], dtype=dtype, tokenizers=args.tokenizers, progress=True),
        mesh,
    )
    refiner = None
    if v["refiner"] is not None:
        refiner = pipeline.StageRunner(
            pipeline.load_stage(
                v["refiner"], dtype=dtype, tokenizers=args.tokenizers, progress=True
            ),
            mesh,
        )
    vae = pipeline.load_vae(args.vae or args.checkpoint, mesh, progress=True)
    vae.tile = args.vae_tile
    load_s = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h, w, f = v["height"], v["width"], v["factor"]
    shape = (h // f, w // f, v["base"].configs["unet"].in_channels)
    jobs = [(p, k) for p in v["prompts"] for k in range(args.num_images)]
    negative = args.negative_prompt
    plans = v["plans"]
    records, images, batch_s = [], [], []
    bar = tqdm(total=len(jobs), unit="img", desc="sampling", file=sys.stderr)
    for start in range(0, len(jobs), batch):
        t_batch = time.perf_counter()
        idx = list(range(start, min(start + batch, len(jobs))))
        full = idx + [idx[-1]] * (batch - len(idx))  # pad: one compiled shape for every batch
        prompts = [jobs[i][0] for i in full]
        if v["noise"] is not None:
            noise = v["noise"][full].transpose(0, 2, 3, 1)
        else:
            noise = pipeline.initial_noise(args.seed, full, shape)
        negs = None if negative is None else [negative] * len(full)
        cond = base.conditioning(prompts, negs, h, w, args.guidance > 1)
        p = plans["base"]
        if v["image"] is not None:
            images_in = np.broadcast_to(v["image"], (len(full), *v["image"].shape))
            keys = pipeline.image_keys(args.seed, 0, full)
            x0 = vae.encode(np.ascontiguousarray(images_in), keys)
            x = p.noised(np.asarray(x0), noise)
        else:
            x = noise * p.init_scale
        # Per-image keys for euler_a's fresh noise: an image does not depend on its batch.
        keys = pipeline.image_keys(args.seed, 1, full)
        x = base.denoise(np.asarray(x, np.float32), p, cond, args.guidance, keys)
        if refiner is not None:
            rcond = refiner.conditioning(prompts, negs, h, w, args.guidance > 1)
            x = refiner.denoise(
                x, plans["refiner"], rcond, args.guidance, pipeline.image_keys(args.seed, 2, full)
            )
        imgs = vae.decode(x)[: len(idx)]
        batch_s.append(time.perf_counter() - t_batch)
        for i, img in zip(idx, imgs, strict=True):
            prompt, k = jobs[i]
            params = dict(
                index=i, prompt=prompt, negative_prompt=negative, image_of_prompt=k,
                seed=args.seed, noise=args.noise, height=h, width=w, steps=args.steps,
                sampler=v["sampler"], karras=v["karras"], guidance=args.guidance,
                checkpoint=origin.get("checkpoint", str(args.checkpoint)),
                refiner=origin.get("refiner", args.refiner),
                handoff=args.handoff if args.refiner else None,
                init_image=args.init_image, strength=args.strength if args.init_image else None,
            )  # fmt: skip
            name = f"{i:05d}.png"
            Image.fromarray(img).save(out / name, pnginfo=png_info(params))
            records.append({**params, "file": name})
            images.append(img)
        bar.update(len(idx))
    bar.close()
    if not args.no_grid and images:
        Image.fromarray(contact_sheet(images)).save(out / "grid.png")
    # The first batch includes compilation; later ones are the steady state.
    steady = batch_s[1:] or batch_s
    manifest = dict(
        images=records,
        settings={k: val for k, val in vars(args).items()},
        devices=[str(d) for d in mesh.devices.flat],
        dtype=str(jnp.dtype(dtype)),
        timings=dict(
            load_s=round(load_s, 3),
            first_batch_s=round(batch_s[0], 3),
            steady_batch_s=round(float(np.mean(steady)), 3),
            seconds_per_image=round(float(np.mean(steady)) / batch, 4),
            total_s=round(time.perf_counter() - t_start, 3),
        ),
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


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
