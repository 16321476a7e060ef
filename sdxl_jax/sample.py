"""Generate images with an SDXL base (and optionally a refiner): ``python -m sdxl_jax.sample``.

Examples:
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --prompt "a red fox in snow" --out out/
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --refiner sdxl-refiner/ \\
      --prompts-file prompts.txt --num-images 4 --sampler dpmpp_2m --karras --out out/
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --init-image cat.png --strength 0.3 \\
      --prompt "a cat, oil painting" --out out/

Evaluation (`--eval`): generate for a prompt set and score the images, e.g. the paper's FID
against CLIP score over guidance scales on COCO captions:
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --prompt-set coco_val_prepared/ \
      --eval fid,clip --eval-count 5000 --guidance 1.5,3,5,8 \
      --inception pt_inception-2015-12-05.safetensors --clip clip-vit-large-patch14/ --out ev/
  python -m sdxl_jax.sample --checkpoint sdxl-base/ --prompt-set PartiPrompts.tsv --eval clip \
      --clip clip-vit-large-patch14/ --out parti/     # per-category CLIP scores

Writes one PNG per image (its settings in a PNG text chunk), grid.png and manifest.json; with
--eval also eval.json (settings, counts, every metric, per-category rows, timings) and, for
several --guidance values, one image folder per scale and sweep.png (FID against CLIP score).
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
from sdxl_jax.inference.generate import DTYPES, Models, NonFiniteError, Request, UsageError

# A manifest entry's settings, in order (then "file").
RECORD_KEYS = (
    "index", "prompt", "negative_prompt", "image_of_prompt", "seed", "noise", "height", "width",
    "steps", "sampler", "karras", "guidance", "checkpoint", "refiner", "handoff", "init_image",
    "strength", "original_size", "crop",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(p)
    g = p.add_argument_group("prompts")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help="a text file, one prompt per line (or a .tsv/.csv "
                     "prompt set, as --prompt-set)")  # fmt: skip
    src.add_argument("--prompt-set", help="a prompt file (.txt one per line, PartiPrompts .tsv, "
                     "DrawBench .csv), a prepared dataset (its captions; its images are the FID "
                     "reference) or 'synthetic' (the synthetic dataset's 72 captions)")  # fmt: skip
    g.add_argument(
        "--negative-prompt",
        help="default: none (the base zeroes its negative conditioning, as SDXL does)",
    )
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    g = p.add_argument_group("sampling")
    g.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: model's, 1024)")
    g.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: model's, 1024)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    g.add_argument("--guidance", type=_floats, default=(5.0,),
                   help="CFG scale; 1 = off (default 5); with --eval a comma-separated list "
                   "runs a sweep (1.5,3,5,8)")  # fmt: skip
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
    g.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"),
                   help="size conditioning: the original image size the model is told "
                   "(default: --height --width; 0 0 for a model trained without it)")  # fmt: skip
    g.add_argument("--crop", type=int, nargs=2, default=(0, 0), metavar=("TOP", "LEFT"),
                   help="crop conditioning: the crop's top-left corner (default 0 0: "
                   "uncropped, object-centred images)")  # fmt: skip
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
    _eval_arguments(p)
    return p.parse_args(argv)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--checkpoint", required=True,
                   help="base: diffusers folder or .safetensors (gs://... is fetched to "
                   "$SDXL_LOCAL_DIR first, like --refiner and --vae)")  # fmt: skip
    g.add_argument("--refiner", help="refiner checkpoint; continues the base after --handoff")
    g.add_argument("--vae", help="a different VAE (diffusers folder or single file)")
    g.add_argument("--tokenizers", help="folder with tokenizer/ and tokenizer_2/ (single files)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA to merge (repeat for several; scale default 1.0): kohya's "
                   ".safetensors (sgm or diffusers block names) or diffusers/PEFT's "
                   "pytorch_lora_weights.safetensors (file or folder); each goes to the stage "
                   "(base or refiner) whose shapes it fits")  # fmt: skip
    g.add_argument("--lora-strict", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse LoRA keys that match no layer (default); --no-lora-strict skips "
                   "them and counts them in the manifest")  # fmt: skip
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="UNet and text encoder weights and compute (auto: bf16 on GPU/TPU, fp32 on CPU); "
        "the VAE always runs in fp32",
    )


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (--eval)")
    g.add_argument("--eval", help="score the images: a comma-separated list of fid, kid, is, "
                   "clip, synthetic")  # fmt: skip
    g.add_argument("--eval-count", type=int, help="a deterministic subset of this many prompts")
    g.add_argument("--eval-seed", type=int, default=0, help="seed of that subset (0)")
    g.add_argument("--inception", help="FID Inception weights .safetensors (pytorch-fid's, "
                   "converted; see python -m sdxl_jax.eval --help)")  # fmt: skip
    g.add_argument("--inception-mode", choices=("pytorch-fid", "clean"), default="pytorch-fid",
                   help="Inception input handling (pytorch-fid: bilinear in the model; clean: "
                   "clean-fid's PIL bicubic resize)")  # fmt: skip
    g.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048),
                   help="FID feature layer (2048: pool3)")  # fmt: skip
    g.add_argument("--ref", help="FID reference: image folder, prepared dataset or stats .npz "
                   "(default with a dataset --prompt-set: the same records' images)")  # fmt: skip
    g.add_argument("--clip", help="CLIP score model: a transformers CLIPModel folder")
    g.add_argument("--stats-cache", help="reference statistics cache (default "
                   "$SDXL_CACHE_DIR/fid_stats or ~/.cache/sdxl_jax/fid_stats)")  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers separated by commas") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def read_prompts(args: argparse.Namespace) -> Any:
    """The prompts as a ``PromptSet`` (``--eval-count`` applied)."""
    from sdxl_jax.eval import prompts as prompts_lib

    if args.prompt:
        found = prompts_lib.PromptSet(
            "--prompt", "text", tuple(map(prompts_lib.Prompt, args.prompt))
        )
    else:
        flag, spec = (
            ("--prompts-file", args.prompts_file) if args.prompts_file
            else ("--prompt-set", args.prompt_set)
        )  # fmt: skip
        try:
            found = prompts_lib.load(spec)
        except prompts_lib.PromptSetError as e:
            raise UsageError(f"{flag}: {e}") from e
    try:
        return found.subset(args.eval_count, args.eval_seed)
    except prompts_lib.PromptSetError as e:
        raise UsageError(str(e)) from e


def read_image(path: str, height: int | None, width: int | None) -> np.ndarray:
    """RGB uint8 [H, W, 3], EXIF-rotated, alpha over white, resized to (height, width)."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(Image.open(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"--init-image {path}: cannot read it as an image ({e})") from e
    # float / int32 images (TIFF): NaN or inf are no pixels
    if img.mode in ("F", "I") and not np.isfinite(np.asarray(img, np.float64)).all():
        raise UsageError(f"--init-image {path} holds NaN or inf pixels")
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


def read_noise(path: str) -> np.ndarray:
    """``--noise``: a float .npy array, every value finite (never unpickled)."""
    if not Path(path).is_file():
        raise UsageError(f"--noise {path} does not exist")
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        what = "an object array" if "Object arrays" in str(e) else "not a .npy array"
        raise UsageError(f"--noise {path} is {what}; save float32 latents with np.save") from None
    if not isinstance(noise, np.ndarray) or noise.dtype.kind != "f":
        raise UsageError(f"--noise {path} holds {getattr(noise, 'dtype', type(noise))}, "
                         "not floats; save float32 latents with np.save")  # fmt: skip
    if not np.isfinite(noise).all():
        bad = int(noise.size - np.isfinite(noise).sum())
        raise UsageError(f"--noise {path} holds {bad} NaN or inf values; initial latents must "
                         "be finite")  # fmt: skip
    return noise


@dataclasses.dataclass(frozen=True)
class Job:
    """The command line, checked: the models to load and the request to run."""

    models: Models
    request: Request  # at the first --guidance value
    prompt_set: Any  # eval.prompts.PromptSet
    guidance: tuple[float, ...]
    options: dict[str, Any]  # make_request's keyword arguments apart from the guidance
    eval: Any = None  # eval.run.EvalSpec with --eval


def validate(args: argparse.Namespace) -> Job:
    """Everything checkable from arguments and configs, before weights load or code compiles."""
    from sdxl_jax.inference.generate import check_models, make_request

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (created if missing)")
    prompt_set = read_prompts(args)
    spec = eval_spec(args, prompt_set)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    from sdxl_jax.inference.loras import parse_spec

    models = check_models(
        args.checkpoint, refiner=args.refiner, vae=args.vae, tokenizers=args.tokenizers,
        loras=[parse_spec(x) for x in args.lora], lora_strict=args.lora_strict,
    )  # fmt: skip
    for lo in models.loras:
        if lo.loaded.skipped:  # only with --no-lora-strict
            names = lo.loaded.skipped
            print(f"warning: LoRA {lo.loaded.path.name}: skipped {len(names)} module(s) that match "
                  f"no layer of the {lo.stage} ({names[:3]}{' ...' if len(names) > 3 else ''})",
                  file=sys.stderr)  # fmt: skip
    image = None
    if args.init_image:
        if not Path(args.init_image).exists():
            raise UsageError(f"--init-image {args.init_image} does not exist")
        image = read_image(args.init_image, args.height, args.width)
    noise = read_noise(args.noise) if args.noise else None
    options = dict(
        negative_prompt=args.negative_prompt, num_images=args.num_images, height=args.height,
        width=args.width, steps=args.steps, sampler=args.sampler, karras=args.karras,
        spacing=args.spacing, seed=args.seed, noise=noise, handoff=args.handoff,
        init_image=image, strength=args.strength,
        original_size=tuple(args.original_size) if args.original_size else None,
        crop=tuple(args.crop),
    )  # fmt: skip
    try:
        request = make_request(models, prompt_set.texts, guidance=args.guidance[0], **options)
    except UsageError as e:
        if str(e).startswith("--noise is"):  # name the file
            raise UsageError(f"--noise {args.noise}{str(e)[len('--noise') :]}") from e
        raise
    return Job(models, request, prompt_set, tuple(args.guidance), options, spec)


def eval_spec(args: argparse.Namespace, prompt_set: Any) -> Any:
    """``--eval``'s settings, checked (weights files exist, a reference where FID needs one);
    None without --eval."""
    from sdxl_jax.eval import evaluators, folders, run

    if not args.eval:
        if len(args.guidance) > 1:
            raise UsageError("several --guidance values are a sweep: add --eval METRICS")
        return None
    try:
        spec = run.EvalSpec(
            evaluators.parse_metrics(args.eval), inception=args.inception, clip=args.clip,
            ref=args.ref, dims=args.dims, mode=args.inception_mode, cache_dir=args.stats_cache,
        )  # fmt: skip
        spec.check(prompt_set)
    except folders.EvalInputError as e:
        raise UsageError(str(e)) from e
    return spec


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Validate, load, generate, write (and with --eval score); returns the manifest (or with
    --eval the report written to eval.json)."""
    t_start = time.perf_counter()
    job = validate(args)
    origin = getattr(args, "origin", {})  # set by main for gs:// checkpoints

    import jax.numpy as jnp

    from sdxl_jax.inference.generate import Generator
    from sdxl_jax.inference.outputs import ImageFolder

    scorers = None
    if job.eval is not None:  # extractors and reference statistics first: errors come early
        from sdxl_jax.eval import run as eval_run

        scorers = eval_run.load_scorers(job.eval, job.prompt_set)
    gen = Generator(
        job.models, dtype=args.dtype, batch_size=args.batch_size, vae_tile=args.vae_tile,
        progress=True,
    )  # fmt: skip
    # The library's settings of each image, plus where noise, images and weights came from.
    paths = dict(
        noise=args.noise, init_image=args.init_image,
        checkpoint=origin.get("checkpoint", str(args.checkpoint)),
        refiner=origin.get("refiner", args.refiner),
    )  # fmt: skip
    categories = [p.category for p in job.prompt_set.prompts]

    def params(rec: dict[str, Any]) -> dict[str, Any]:
        out = {k: paths[k] if k in paths else rec[k] for k in RECORD_KEYS}
        if category := categories[rec["index"] // args.num_images]:  # PartiPrompts, DrawBench
            out["category"] = category
        return out

    settings = {k: val for k, val in vars(args).items() if k != "origin"}
    settings["loras"] = [lo.describe() for lo in job.models.loras]
    if scorers is not None:
        return eval_run.evaluate_generation(
            gen, job.prompt_set, scorers, out=args.out, guidance=job.guidance,
            request=job.options, settings=settings, image_params=params,
        )  # fmt: skip
    folder = ImageFolder(args.out, grid=not args.no_grid)
    batch_s, nonfinite = [], []
    for batch in gen.batches(job.request):
        for img, rec, ok in zip(batch.images, batch.records, batch.finite, strict=True):
            if ok:
                folder.write(img, params(rec))
            else:  # no PNG: its pixels would be black, not an image
                nonfinite.append(rec["index"])
        batch_s.append(batch.seconds)
    manifest = folder.finish(
        settings=settings,
        devices=[str(d) for d in gen.mesh.devices.flat],
        dtype=str(jnp.dtype(gen.dtype)),
        timings=gen.timings(batch_s, t_start),
        nonfinite=nonfinite,
    )
    if nonfinite:
        raise NonFiniteError(nonfinite)
    return manifest


def summary(manifest: dict[str, Any], out: str) -> str:
    """What the run did, in a few lines (for stderr)."""
    if "results" in manifest:  # --eval
        lines = []
        for row in manifest["results"]:
            scores = {k: v for k, v in row.items() if isinstance(v, float) and k != "guidance"}
            text = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            lines.append(f"guidance {row['guidance']:g}: {text}")
            lines += [f"  warning: {w}" for w in row.get("warnings", [])]
        return "\n".join(lines + [f"wrote {out}/eval.json ({manifest['total_s']:.0f} s)"])
    t = manifest["timings"]
    return (
        f"wrote {len(manifest['images'])} images to {out} "
        f"(load {t['load_s']:.1f} s, first batch {t['first_batch_s']:.1f} s incl. compile, "
        f"{t['seconds_per_image']:.2f} s/image after)"
    )


def fetch_remote(args: argparse.Namespace) -> None:
    """gs://... checkpoints -> a copy on this machine's disk (``args.origin`` keeps the URLs,
    which the images record); ``--out`` must be local. Raises ValueError / FileNotFoundError."""
    from sdxl_jax import workdir

    args.origin = {}
    workdir.local_only(args.out, "--out")
    for name in ("checkpoint", "refiner", "vae"):
        value = getattr(args, name)
        if value and workdir.is_remote(value):
            args.origin[name] = value
            setattr(args, name, str(workdir.fetch(value)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        fetch_remote(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        manifest = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the finite images and manifest.json are in {args.out}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(summary(manifest, args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
