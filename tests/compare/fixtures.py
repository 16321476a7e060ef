"""Runs for the study tests, written by the real ``sample`` output writer (``ImageFolder``):
every image of run ``a`` is one flat colour and every image of run ``b`` another, so that a
test can tell from the pixels which run a served image came from."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from sdxl_jax.inference.outputs import ImageFolder

COLOURS = {"a": (200, 30, 30), "b": (30, 30, 200), "c": (30, 160, 30), "d": (200, 200, 30)}
PROMPTS = [
    ("a red circle", "Animals"),
    ("a blue square", "Animals"),
    ("a green triangle", "Food & Beverage"),
    ("a red circle", "Animals"),  # the same prompt twice: a second occurrence, its own item
]


def write_run(folder: Path, name: str, *, prompts=PROMPTS, seed: int = 0, num_images: int = 1,
              size: int = 32) -> Path:  # fmt: skip
    """A sample-style output folder of flat ``COLOURS[name]`` images with its manifest."""
    out = ImageFolder(folder)
    index = 0
    for text, category in prompts:
        for k in range(num_images):
            img = np.zeros((size, size, 3), np.uint8) + np.array(COLOURS[name], np.uint8)
            img[0, 0] = (index % 256, index // 256 % 256, k)  # images differ, not in colour
            params = dict(
                index=index, prompt=text, negative_prompt=None, image_of_prompt=k, seed=seed,
                noise=None, height=size, width=size, steps=4, sampler="euler", karras=False,
                guidance=5.0, checkpoint=f"/models/{name}-secret-checkpoint", refiner=None,
                handoff=0.8, init_image=None, strength=0.3, category=category,
            )  # fmt: skip
            out.write(img, params)
            index += 1
    out.finish(settings={"run": name})
    return folder


def run_of(png: bytes) -> str:
    """Which run's colour a PNG shows."""
    from PIL import Image

    pixel = tuple(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[5, 5].tolist())
    return next(name for name, colour in COLOURS.items() if colour == pixel)
