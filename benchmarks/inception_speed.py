"""Inception pool3 features per second: ours (``InceptionExtractor``, pytorch-fid mode) against
pytorch-fid's ``InceptionV3`` (torch, eval, no_grad), same weights, same images, same run.

Both see the same random uint8 512x512 images in batches of 50 (pytorch-fid's default batch),
go through /255, the bilinear resize to 299x299 and the network; each is warmed up on one batch
first (our compile, torch's first-call allocations). The weights are random: pytorch-fid's
``fid_inception_v3`` built around a random state dict instead of the download, written to a
temporary safetensors file for ours. Timings alternate between the two, ``--repeats`` times; the
best of each is reported.

    python benchmarks/inception_speed.py --images 200
    python benchmarks/inception_speed.py --smoke      # 50 images, one repeat: seconds

Not a test. The numbers go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

# Runnable as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def torch_reference(folder: Path):
    """(pytorch-fid's InceptionV3 on random weights, the safetensors file of those weights)."""
    import torch
    import torchvision
    from pytorch_fid import inception as pfid
    from safetensors.torch import save_file

    torch.manual_seed(0)
    template = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    ).state_dict()
    with mock.patch.object(pfid, "load_state_dict_from_url", lambda *a, **k: template):
        model = pfid.InceptionV3([3]).eval()  # block 3: pool3, what FID reads
        net = pfid.fid_inception_v3()
    path = folder / "pt_inception-2015-12-05.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return model, path


def time_torch(model, images: np.ndarray, batch: int) -> float:
    """Seconds for pool3 of every image, as pytorch-fid's ``get_activations`` computes it."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 255
            model(x)[0].numpy()
    return time.perf_counter() - start


def time_ours(extractor, images: np.ndarray) -> float:
    start = time.perf_counter()
    extractor.features(images)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="image side before the resize")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="50 images, one repeat")
    args = p.parse_args()
    if args.smoke:
        args.images, args.repeats = 50, 1

    import jax
    import torch

    from sdxl_jax.eval.inception import InceptionExtractor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        model, path = torch_reference(Path(tmp))
        extractor = InceptionExtractor(path, batch_size=args.batch_size)
    warm = images[: args.batch_size]
    t0 = time.perf_counter()
    time_ours(extractor, warm)
    compile_s = time.perf_counter() - t0
    time_torch(model, warm, args.batch_size)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_ours(extractor, images))
        theirs.append(time_torch(model, images, args.batch_size))
    ours_ips, torch_ips = args.images / min(ours), args.images / min(theirs)
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].platform}")
    print(
        f"jax {jax.__version__} ({len(jax.devices())} device(s)), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print(
        f"{args.images} images {args.size}x{args.size} uint8, batch {args.batch_size}, "
        f"best of {args.repeats}; our first batch (compile + run): {compile_s:.1f} s"
    )
    print(
        f"ours (InceptionExtractor, pytorch-fid mode): {ours_ips:.2f} images/s "
        f"({', '.join(f'{t:.1f}' for t in ours)} s)"
    )
    print(
        f"pytorch-fid InceptionV3 (torch, eval):       {torch_ips:.2f} images/s "
        f"({', '.join(f'{t:.1f}' for t in theirs)} s)"
    )
    print(f"ratio ours / pytorch-fid: {ours_ips / torch_ips:.2f}x")


if __name__ == "__main__":
    main()
