"""Prompt sets for evaluation, each prompt with its category where the set has one.

- a text file, one prompt per line (``.txt`` or any other suffix);
- PartiPrompts' TSV (``Prompt``, ``Category``, ``Challenge``, ``Note`` columns; ``.tsv``);
- a DrawBench-style CSV (``Prompts`` or ``Prompt`` and ``Category`` columns; ``.csv``);
- a dataset ``python -m sdxl_jax.data.prepare`` made (a folder with ``sdxl_index.npz``): its
  captions, each remembering its record, whose image is a FID reference;
- ``synthetic``: the synthetic dataset's 72 captions (category: the shape), scored exactly.

``subset(count, seed)`` picks the same prompts for the same seed, in the set's order.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

SYNTHETIC = "synthetic"


class PromptSetError(ValueError):
    """A prompt set that cannot be read, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None
    challenge: str | None = None
    record: int | None = None  # a prepared dataset's record (its image is a FID reference)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    name: str  # the file or dataset it came from
    kind: str  # "text" | "parti" | "drawbench" | "dataset" | "synthetic"
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def subset(self, count: int | None, seed: int = 0) -> PromptSet:
        """``count`` prompts drawn without replacement by ``seed``, kept in the set's order."""
        if count is None or count == len(self.prompts):
            return self
        if count < 1:
            raise PromptSetError(f"--eval-count must be at least 1, got {count}")
        if count > len(self.prompts):
            raise PromptSetError(
                f"--eval-count {count} is more than the {len(self.prompts)} prompts of "
                f"{self.name}; use --num-images for several images per prompt"
            )
        keep = np.sort(np.random.default_rng(seed).permutation(len(self.prompts))[:count])
        return dataclasses.replace(self, prompts=tuple(self.prompts[i] for i in keep))


def load(spec: str | Path) -> PromptSet:
    """A prompt set from a file, a prepared dataset folder or ``synthetic``."""
    spec = str(spec)
    if spec == SYNTHETIC:
        return _synthetic()
    path = Path(spec)
    if path.is_dir():
        if not (path / "sdxl_index.npz").exists():
            raise PromptSetError(
                f"{path} is a folder but not a prepared dataset (no sdxl_index.npz); give a "
                "prompt file (.txt, PartiPrompts .tsv, DrawBench .csv) or a dataset from "
                "`python -m sdxl_jax.data.prepare`"
            )
        return _dataset(path)
    if not path.is_file():
        raise PromptSetError(f"prompt set {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PromptSetError(
            f"{path} is not UTF-8 text (byte {e.start}, line {line}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise PromptSetError(f"cannot read prompt set {path} ({e.strerror})") from None
    if path.suffix.lower() == ".tsv":
        prompts = _table(path, text, "\t", ("Prompt",), "parti")
        kind = "parti"
    elif path.suffix.lower() == ".csv":
        prompts = _table(path, text, ",", ("Prompts", "Prompt", "prompt", "text"), "drawbench")
        kind = "drawbench"
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
        kind = "text"
    if not prompts:
        raise PromptSetError(f"{path} holds no prompts")
    return PromptSet(str(path), kind, tuple(prompts))


def _table(
    path: Path, text: str, delimiter: str, prompt_columns: tuple[str, ...], kind: str
) -> list[Prompt]:
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    columns = list(rows[0].keys()) if rows else []
    column = next((c for c in prompt_columns if c in columns), None)
    if column is None:
        raise PromptSetError(
            f"{path}: no prompt column (looked for {', '.join(prompt_columns)}; the file has "
            f"{columns}); a {kind} file needs a header row"
        )
    category = next((c for c in ("Category", "category") if c in columns), None)
    challenge = "Challenge" if "Challenge" in columns else None
    return [
        Prompt(
            row[column].strip(),
            (row.get(category) or "").strip() or None if category else None,
            (row.get(challenge) or "").strip() or None if challenge else None,
        )
        for row in rows
        if (row.get(column) or "").strip()
    ]


def _dataset(path: Path) -> PromptSet:
    from sdxl_jax.data import batching

    source = batching.open_source(path)
    prompts = []
    for i in range(len(source)):
        caption = source[i]["caption"]
        text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        prompts.append(Prompt(text, record=i))
    return PromptSet(str(path), "dataset", tuple(prompts))


def _synthetic() -> PromptSet:
    from sdxl_jax.data import synthetic

    prompts = [
        Prompt(synthetic.caption_for(c, s, p), category=s)
        for c in synthetic.COLOURS
        for s in synthetic.SHAPES
        for p in synthetic.POSITIONS
    ]
    return PromptSet(SYNTHETIC, SYNTHETIC, tuple(prompts))
