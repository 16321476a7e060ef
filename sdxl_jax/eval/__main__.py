"""Score images that exist (generated here or elsewhere): ``python -m sdxl_jax.eval``.

Examples:
  python -m sdxl_jax.eval fid --inception pt_inception-2015-12-05.safetensors \\
      --ref coco_val/ --images samples/            # prints "fid: <value>"
  python -m sdxl_jax.eval clip-score --clip clip-vit-large-patch14/ --images samples/ \\
      --prompts prompts.txt                        # prints "clip_score: <value>"
  python -m sdxl_jax.eval is --inception pt_inception-2015-12-05.safetensors --images samples/
  python -m sdxl_jax.eval stats --inception pt_inception-2015-12-05.safetensors \\
      --images coco_val/ --out coco_val_stats.npz

Images are a folder's files (png, jpg, webp, ...) sorted by name; unreadable ones are skipped
and counted. --ref is a folder, a prepared dataset or a statistics .npz (from `stats`, or
pytorch-fid's --save-stats); statistics of a folder are cached in $SDXL_CACHE_DIR/fid_stats
(default ~/.cache/sdxl_jax/fid_stats). The Inception weights are pytorch-fid's, converted once:
  python -c "import torch, safetensors.torch as st; sd = torch.load(
      'pt_inception-2015-12-05-6726825d.pth', map_location='cpu', weights_only=True);
      st.save_file({k: v.contiguous() for k, v in sd.items()},
      'pt_inception-2015-12-05.safetensors')"
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from sdxl_jax.eval import folders


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def inception(q: argparse.ArgumentParser) -> None:
        q.add_argument("--inception", required=True, help="FID Inception weights .safetensors")
        q.add_argument("--mode", choices=("pytorch-fid", "clean"), default="pytorch-fid",
                       help="input handling: pytorch-fid (bilinear resize to 299 in the model) "
                       "or clean (clean-fid's PIL bicubic resize of the uint8 images)")  # fmt: skip
        q.add_argument("--batch-size", type=int, default=50, help="images per batch (50)")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--images", required=True, help="folder of images to score")
        q.add_argument("--json", help="also write the result and counts to this JSON file")

    q = sub.add_parser("fid", help="FID (and KID) of a folder against a reference")
    inception(q)
    common(q)
    q.add_argument("--ref", required=True, help="reference: image folder, dataset or .npz")
    q.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048))
    q.add_argument("--kid", action="store_true", help="also KID (needs reference features)")
    q.add_argument("--stats-cache", help="where reference statistics are cached")
    q = sub.add_parser("clip-score", help="CLIP score of a folder against its prompts")
    common(q)
    q.add_argument("--clip", required=True, help="a transformers CLIPModel folder")
    q.add_argument("--prompts", help="one prompt per line, in file-name order (default: the "
                   "folder's manifest.json)")  # fmt: skip
    q.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    q = sub.add_parser("is", help="Inception Score of a folder")
    inception(q)
    common(q)
    q.add_argument("--splits", type=int, default=10, help="splits (10)")
    q = sub.add_parser("stats", help="FID statistics of a folder or dataset, saved as .npz")
    inception(q)
    q.add_argument("--images", required=True, help="image folder or prepared dataset")
    q.add_argument("--out", required=True, help="the .npz to write")
    q.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048))
    return p


def _spec(args: argparse.Namespace, metrics: tuple[str, ...]) -> Any:
    from sdxl_jax.eval.run import EvalSpec

    return EvalSpec(
        metrics, inception=getattr(args, "inception", None), clip=getattr(args, "clip", None),
        ref=getattr(args, "ref", None), dims=getattr(args, "dims", 2048),
        mode=getattr(args, "mode", "pytorch-fid"), cache_dir=getattr(args, "stats_cache", None),
        batch_size=args.batch_size, is_splits=getattr(args, "splits", 10),
    )  # fmt: skip


def _score(args: argparse.Namespace, metrics: tuple[str, ...]) -> dict[str, Any]:
    from sdxl_jax.eval import evaluators as ev
    from sdxl_jax.eval import run
    from sdxl_jax.eval.prompts import Prompt

    spec = _spec(args, metrics)
    spec.check(None)
    files = folders.image_files(args.images)
    texts = folders.folder_prompts(args.images, files, args.prompts) if "clip" in metrics else None
    scorers = run.load_scorers(spec)
    skipped = folders.Skipped()

    def batches():
        for keep, imgs in folders.read_batches(files, args.batch_size, skipped):
            yield imgs, [Prompt(texts[i] if texts else "") for i in keep]

    result = run.score_batches(
        scorers.fresh(), ev.progress(batches(), "images", images=lambda b: len(b[0]))
    )
    return {
        "images": str(args.images), "files": len(files), "skipped": skipped.as_dict(),
        **result, **scorers.reference_info, "extractors": run.extractors(scorers),
    }  # fmt: skip


def _stats(args: argparse.Namespace) -> dict[str, Any]:
    from sdxl_jax.eval import evaluators as ev
    from sdxl_jax.eval import metrics
    from sdxl_jax.eval.inception import InceptionExtractor

    spec = _spec(args, ("is",))
    spec.check(None)
    extractor = InceptionExtractor(spec.inception, mode=spec.mode, batch_size=spec.batch_size)
    _, batches = ev.image_source(args.images, None, spec.batch_size)
    skipped = folders.Skipped()
    stats = ev.compute_stats(ev.progress(batches(skipped), "images"), extractor, spec.dims,
                             str(args.images))  # fmt: skip
    metrics.save_stats(stats, args.out)
    return {"out": str(args.out), "images": stats.count, "skipped": skipped.as_dict(),
            "dims": spec.dims, "fingerprint": stats.fingerprint}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        if args.command == "fid":
            result = _score(args, ("fid", "kid") if args.kid else ("fid",))
            line = f"fid: {result['fid']:.6g}"
            if "kid" in result:
                line += f"\nkid: {result['kid']:.6g} +- {result['kid_std']:.3g}"
        elif args.command == "clip-score":
            result = _score(args, ("clip",))
            line = f"clip_score: {result['clip_score']:.6g}"
        elif args.command == "is":
            result = _score(args, ("is",))
            line = f"is: {result['is']:.6g} +- {result['is_std']:.3g}"
        else:
            result = _stats(args)
            line = f"wrote {result['out']} ({result['images']} images, {result['dims']}-d)"
    except (folders.EvalInputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in result.get("warnings", []):
        print(f"warning: {note}", file=sys.stderr)
    if result.get("skipped", {}).get("count"):
        print(f"skipped {result['skipped']['count']} unreadable images", file=sys.stderr)
    if getattr(args, "json", None):
        from sdxl_jax.eval.run import jsonable

        Path(args.json).write_text(json.dumps(result, indent=2, default=jsonable))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
