"""CLIP-score image embeddings per second: ours (``CLIPEmbedder``) against transformers
(``CLIPProcessor`` + ``CLIPModel.get_image_features``, what torchmetrics' ``CLIPScore`` runs),
same random weights, same images, same run.

Both see the same random uint8 images (default 512x512) and go through the whole path:
CLIPImageProcessor's resize / crop / normalise, then the vision tower and projection, in
batches of ``--batch``. The model is a random ``transformers.CLIPModel`` of the chosen shape
(``--preset vit_b_32`` default; ``vit_l_14`` is what SDXL papers report), saved as a folder with a
small tokenizer. Each side is warmed up on one batch (our compile), then the two alternate
``--repeats`` times; the best of each is reported.

    python benchmarks/clip_score_speed.py --images 96
    python benchmarks/clip_score_speed.py --smoke          # a tiny model, 16 images: seconds

Not a test. The numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {  # transformers CLIPConfig vision / text shapes
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, image_size=224, patch_size=32),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4), projection_dim=32),
    "vit_b_32": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=224, patch_size=32),
                     text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                               num_attention_heads=8), projection_dim=512),
    "vit_l_14": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=224, patch_size=14),
                     text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12), projection_dim=768),
}  # fmt: skip


def make_folder(folder: Path, preset: str):
    import torch
    import transformers

    from sdxl_jax.data.tokenizer import EOS_TOKEN, synthetic_words, write_clip_tokenizer

    write_clip_tokenizer(folder, synthetic_words(), pad_token=EOS_TOKEN)
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    p = PRESETS[preset]
    text = dict(p["text"], vocab_size=tok.eos_token_id + 1, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=p["vision"], projection_dim=p["projection_dim"]
    )).eval()  # fmt: skip
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor().save_pretrained(folder)  # OpenAI's 224 settings
    return model, transformers.CLIPProcessor.from_pretrained(folder)


def time_reference(model, processor, images: list[np.ndarray], batch: int) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            px = processor(images=images[i : i + batch], return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=px)
            getattr(out, "pooler_output", out).numpy()
    return time.perf_counter() - start


def time_ours(embedder, images: list[np.ndarray]) -> float:
    start = time.perf_counter()
    embedder.image_embeds(images)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--size", type=int, default=512, help="square input images of this side")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vit_b_32")
    p.add_argument("--smoke", action="store_true", help="tiny model, 16 images, one repeat")
    args = p.parse_args()
    if args.smoke:
        args.images, args.repeats, args.preset, args.batch = 16, 1, "tiny", 8

    import jax
    import torch

    from sdxl_jax.eval.clip import CLIPEmbedder

    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = make_folder(Path(tmp), args.preset)
        embedder = CLIPEmbedder(tmp, batch_size=args.batch)
        t0 = time.perf_counter()
        embedder.image_embeds(images[: args.batch])
        first = time.perf_counter() - t0
        time_reference(model, processor, images[: args.batch], args.batch)
        ours, ref = [], []
        for _ in range(args.repeats):
            ref.append(time_reference(model, processor, images, args.batch))
            ours.append(time_ours(embedder, images))
    n = args.images
    print(f"machine: {platform.processor() or platform.machine()}, jax {jax.__version__} "
          f"({jax.default_backend()}, {jax.device_count()} devices), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    print(f"preset {args.preset}, {n} images {args.size}x{args.size}, batch {args.batch}")
    print(f"ours: first batch (compile + run) {first:.1f} s; runs {[round(t, 2) for t in ours]} s"
          f" -> {n / min(ours):.2f} images/s")  # fmt: skip
    print(f"transformers: runs {[round(t, 2) for t in ref]} s -> {n / min(ref):.2f} images/s")
    print(f"ratio ours / transformers: {min(ref) / min(ours):.2f}x")


if __name__ == "__main__":
    main()
