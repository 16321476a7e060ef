"""The tiny autoencoder stage's wall time on this machine, and how well its EMA reconstructs.

Runs what the train loop runs for ``experiments/autoencoder.py:tiny`` (data prepared from
``synthetic:N``, the task's init, every step through the Grain iterator, the export and a preview)
and reports seconds per phase; then encodes + decodes the first 144 dataset images (2 per
caption) at 64 x 64 with the exported EMA VAE and scores them with the synthetic dataset's exact
scorer beside the originals.

    python benchmarks/autoencoder_tiny.py [--steps N] [--workdir DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from experiments import autoencoder as experiment
from sdxl_jax import sharding
from sdxl_jax.data import batching, prepare, synthetic
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train.autoencoder import AutoencoderTask, dataset_images
from sdxl_jax.weights import diffusers_io

EVAL_IMAGES = 144


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=0, help="override optim.total_steps")
    p.add_argument("--workdir", default="")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. ae.crop=32")
    args = p.parse_args()
    config = experiment.get_config("tiny")
    if args.steps:
        config.optim.total_steps = args.steps
    for item in args.set:
        key, value = item.split("=", 1)
        *groups, leaf = key.split(".")
        node = config
        for g in groups:
            node = node[g]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value  # a plain string
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ae_tiny_"))
    times: dict[str, float] = {}
    t_all = t = time.perf_counter()

    n = int(config.data.path.split(":")[1])
    data = workdir / "data" / f"synthetic_{n}"
    if not (data / batching.INDEX_FILE).exists():
        prepare.prepare(config.data.path, data, workers=1, progress=False)
    times["prepare_data"] = time.perf_counter() - t

    t = time.perf_counter()
    mesh = sharding.make_mesh(dict(config.mesh))
    task = AutoencoderTask(config, mesh)
    state = task.init_state()
    jax.block_until_ready(state)
    times["setup"] = time.perf_counter() - t

    fields = {"bucket_set", "global_batch_size", "remainder", "random_crop", "flip", "num_workers"}
    dcfg = data_pipeline.DataConfig(
        path=str(data), seed=config.seed, **{k: v for k, v in config.data.items() if k in fields}
    )
    it = data_pipeline.make_iterator(dcfg, verbose=False)
    total = config.optim.total_steps
    t = time.perf_counter()
    metrics, log = None, []
    for step in range(total):
        batch = data_pipeline.to_global({"image": next(it)["image"]}, mesh, sharding.BATCH_AXES)
        state, metrics = task.step(state, batch)
        if step == 0:
            jax.block_until_ready(metrics)
            times["first_step"] = time.perf_counter() - t
            t = time.perf_counter()
        if (step + 1) % 50 == 0 or step + 1 == total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            log.append({"step": step + 1, **{k: round(v, 4) for k, v in m.items()}})
            print(
                f"step {step + 1}: l1 {m['l1']:.4f} kl {m['kl']:.4f} g {m['g_loss']:.3f} "
                f"d {m['d_loss']:.3f} w {m['d_weight']:.3f}",
                flush=True,
            )
    jax.block_until_ready(state)
    it.close()
    times["steps"] = time.perf_counter() - t
    times["ms_per_step"] = 1000 * times["steps"] / max(total - 1, 1)

    t = time.perf_counter()
    vae_dir = task.export(state, workdir / "autoencoder" / "export")
    grid = task.preview(state)
    times["export_preview"] = time.perf_counter() - t
    times["stage_total"] = time.perf_counter() - t_all
    times["stage_total_without_data"] = times["stage_total"] - times["prepare_data"]

    # -- score reconstructions at 64 x 64 ---------------------------------------------------
    x = dataset_images(str(data), "tiny_square_64", EVAL_IMAGES)
    captions = [e["caption"] for e in synthetic.examples(EVAL_IMAGES)]
    vae = diffusers_io.load_component(vae_dir.parent, "vae")
    rec = np.concatenate(
        [np.asarray(vae(jax.numpy.asarray(x[i : i + 48]))) for i in range(0, len(x), 48)]
    )
    to_u8 = lambda a: np.rint((np.clip(a, -1, 1) + 1) * 127.5).astype(np.uint8)
    scores = {
        "originals": synthetic.accuracy(to_u8(x), captions),
        "reconstructions": synthetic.accuracy(to_u8(rec), captions),
    }
    psnr = 10 * np.log10(4.0 / np.mean((np.clip(rec, -1, 1) - x) ** 2))
    result = {
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "scores": scores,
        "psnr_db": round(float(psnr), 2),
        "scaling_factor": json.loads((vae_dir / "config.json").read_text())["scaling_factor"],
        "steps": total,
        "batch": config.data.global_batch_size,
        "cpus": os.cpu_count(),
        "log": log,
    }
    if grid is not None:
        from PIL import Image

        Image.fromarray(grid).save(workdir / "preview.png")
    (workdir / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))
    print(f"workdir: {workdir}")


if __name__ == "__main__":
    main()
