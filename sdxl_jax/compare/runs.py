"""The runs of a study: ``python -m sdxl_jax.sample`` output folders, matched image by image.

Two images are a pair when they answer the same prompt from the same noise: the same prompt
text, seed and image-of-prompt number (and, for a prompt that appears several times in the set,
the same occurrence), as each folder's ``manifest.json`` records them. Images that only some
runs have are listed and left out. A run's images are resolved to files inside its folder once,
here; the server never builds a path from a request.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

RUN_NAMES = ("a", "b", "c", "d")


class StudyError(ValueError):
    """Runs that cannot be compared, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One prompt + noise that every run drew an image for."""

    key: str  # stable id: JSON of [prompt, seed, image_of_prompt, occurrence]
    prompt: str
    seed: int
    image_of_prompt: int
    category: str | None
    files: dict[str, Path]  # run name -> its PNG


@dataclasses.dataclass(frozen=True)
class Study:
    runs: dict[str, Path]  # name -> folder (resolved)
    items: tuple[Item, ...]
    left_out: tuple[str, ...]  # one line per image that not every run has

    def pairs(self) -> list[tuple[str, str]]:
        """Every pair of runs (in name order)."""
        names = sorted(self.runs)
        return [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]


def item_key(prompt: str, seed: int, image_of_prompt: int, occurrence: int) -> str:
    return json.dumps([prompt, int(seed), int(image_of_prompt), int(occurrence)])


def read_run(folder: str | Path) -> dict[str, dict[str, Any]]:
    """A run's images by item key: each record of its manifest with ``path`` (checked to exist
    inside the folder)."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not folder.is_dir():
        raise StudyError(f"{folder} is not a folder; give an output folder of python -m "
                         "sdxl_jax.sample (or of python -m sdxl_jax.compare make)")  # fmt: skip
    if not manifest.is_file():
        raise StudyError(f"{folder} has no manifest.json: is it a finished python "
                         "-m sdxl_jax.sample output folder? (a stopped run writes it "
                         "last)")  # fmt: skip
    try:
        records = json.loads(manifest.read_text("utf-8"))["images"]
        if not isinstance(records, list):
            raise TypeError("'images' is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise StudyError(f"{manifest}: not a sample manifest ({e})") from e
    root = folder.resolve()
    seen: dict[tuple, int] = {}
    out: dict[str, dict[str, Any]] = {}
    for n, rec in enumerate(records):
        try:
            ident = (str(rec["prompt"]), int(rec["seed"]), int(rec.get("image_of_prompt", 0)))
            name = str(rec["file"])
        except (KeyError, TypeError, ValueError) as e:
            raise StudyError(f"{manifest}: image {n} lacks prompt/seed/file ({e})") from e
        occurrence = seen.get(ident, 0)
        seen[ident] = occurrence + 1
        path = (folder / name).resolve()
        if not path.is_relative_to(root) or path.suffix.lower() != ".png":
            raise StudyError(f"{manifest}: image {n} names {name!r}, not a PNG in the folder")
        out[item_key(*ident, occurrence)] = {**rec, "path": path}
    return out


def load_study(runs: dict[str, str | Path]) -> Study:
    """The images every run has, as items; the rest listed in ``left_out``."""
    if len(runs) < 2:
        raise StudyError("a study needs at least two runs (--a and --b)")
    folders = {name: Path(f).resolve() for name, f in runs.items()}
    if len(set(folders.values())) < len(folders):
        raise StudyError(f"the runs must be different folders, got {runs}")
    read = {name: read_run(runs[name]) for name in sorted(runs)}
    keys = set.intersection(*(set(r) for r in read.values()))
    left_out = []
    for name, recs in read.items():
        for key, rec in recs.items():
            if key not in keys:
                left_out.append(f"{name}: {rec['file']} ({key}) has no match in every other run")
    items = []
    first = next(iter(read.values()))
    for key in sorted(keys, key=lambda k: str(first[k]["file"])):
        files = {name: recs[key]["path"] for name, recs in read.items()}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            left_out.append(f"{key}: missing file {missing[0]}")
            continue
        rec = first[key]
        category = next((r[key].get("category") for r in read.values() if r[key].get("category")),
                        None)  # fmt: skip
        items.append(Item(key, str(rec["prompt"]), int(rec["seed"]),
                          int(rec.get("image_of_prompt", 0)), category, files))  # fmt: skip
    if not items:
        raise StudyError(
            f"no image matches across {', '.join(str(f) for f in folders.values())}: make them "
            "from the same prompts and seeds (python -m sdxl_jax.compare make does)"
        )
    return Study(folders, tuple(items), tuple(left_out))
