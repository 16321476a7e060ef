"""Images to score: a folder (generated here or elsewhere) or a prepared dataset's records.

A folder's images are its files with pytorch-fid's extensions, sorted by file name (or those its
``manifest.json`` lists: ``sample``'s folders hold a ``grid.png`` too); unreadable files are
skipped and counted (their names kept for the report). Prompts for a folder come from
a text file (one per line, matched to the sorted images) or the folder's ``manifest.json``
(written by ``python -m sdxl_jax.sample``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sdxl_jax.data import images as images_lib

EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})


class EvalInputError(ValueError):
    """Images or prompts that cannot be scored, with what to do about it."""


@dataclasses.dataclass
class Skipped:
    """Unreadable inputs: how many, and the first few with the reason."""

    count: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(f"{name}: {reason}")

    def as_dict(self) -> dict:
        return {"count": self.count, "examples": self.examples}


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder``, sorted by name: those its ``manifest.json`` lists when it
    has one (``sample``'s output: not ``grid.png``), else every image file. An empty or missing
    folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalInputError(f"image folder {folder} does not exist")
    manifest = folder / "manifest.json"
    if manifest.is_file():
        listed = {r["file"] for r in json.loads(manifest.read_text()).get("images", [])}
        files = sorted(folder / name for name in listed)
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in EXTENSIONS)
    if not files:
        raise EvalInputError(
            f"{folder} holds no images (looked for {', '.join(sorted(EXTENSIONS))})"
        )
    return files


def read_batches(
    files: Sequence[Path], batch_size: int, skipped: Skipped
) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """(positions in ``files``, uint8 [H, W, 3] images) in batches; bad files skipped."""
    keep, batch = [], []
    for i, path in enumerate(files):
        try:
            batch.append(images_lib.decode_rgb(path.read_bytes()))
            keep.append(i)
        except images_lib.BadImage as e:
            skipped.add(path.name, e.reason)
        except OSError as e:
            skipped.add(path.name, f"{type(e).__name__}: {e}")
        if len(batch) == batch_size:
            yield keep, batch
            keep, batch = [], []
    if batch:
        yield keep, batch


def dataset_batches(
    path: str | Path, records: Sequence[int] | None, batch_size: int, skipped: Skipped
) -> Iterator[list[np.ndarray]]:
    """The images of a prepared dataset's ``records`` (all when None), in batches."""
    from sdxl_jax.data import batching

    source = batching.open_source(path)
    records = range(len(source)) if records is None else records
    batch = []
    for i in records:
        try:
            batch.append(images_lib.decode_rgb(source[int(i)]["image"]))
        except images_lib.BadImage as e:
            skipped.add(f"record {i}", e.reason)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def folder_prompts(folder: str | Path, files: Sequence[Path], prompts: str | None) -> list[str]:
    """One prompt per image file: from ``prompts`` (one per line, in file-name order) or, when
    None, from the folder's manifest.json."""
    folder = Path(folder)
    if prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise EvalInputError(f"--prompts {path} does not exist")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(lines) != len(files):
            raise EvalInputError(
                f"--prompts {path} has {len(lines)} prompts for {len(files)} images in "
                f"{folder}; give one prompt per image, in the order of the sorted file names"
            )
        return lines
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise EvalInputError(
            f"{folder} has no manifest.json: pass --prompts FILE (one prompt per line, in the "
            "order of the sorted file names)"
        )
    by_file = {r["file"]: r["prompt"] for r in json.loads(manifest.read_text())["images"]}
    missing = [f.name for f in files if f.name not in by_file]
    if missing:
        raise EvalInputError(
            f"{manifest} has no prompt for {len(missing)} images (first: {missing[0]}); pass "
            "--prompts FILE"
        )
    return [by_file[f.name] for f in files]
