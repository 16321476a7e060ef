"""Source specs for ``python -m sdxl_jax.data.prepare``: ``KIND:LOCATION[?key=value&...]``.

Every source lists its records once, in a fixed order (so an interrupted build resumes on the same
record numbering), and then loads record i on demand, in any process: the objects are small and
picklable (lists of paths / offsets), and file handles are opened lazily per process.

  folder:DIR                      images under DIR (recursive, sorted by relative path), each with
                                  a same-named caption file (a.jpg + a.txt; ?caption_ext=.caption
                                  for another extension); key: the relative path.
                                  ?layout=kohya: kohya's DreamBooth folders DIR/N_tokens/ (N
                                  repeats per epoch; caption file, else the folder's tokens).
                                  ?caption=TEXT: the caption of images without a caption file.
  jsonl:FILE | csv:FILE | parquet:FILE
                                  a manifest, one row per image. Options: image=COL (default: the
                                  first of image, file_name, path, image_path, filename, file),
                                  caption=COL (caption, text, prompt, captions), key=COL (default:
                                  column "key" if present, else the image path; a repeated key is
                                  skipped as duplicate_key), root=DIR (where relative paths
                                  start; default: the manifest's folder). An image cell is a path,
                                  or the encoded bytes / {"bytes", "path"} struct that Hugging
                                  Face parquet files hold. A list cell holds several captions.
  webdataset:SHARDS               tar shards, a glob and/or brace list: "dir/shards-{000..009}.tar".
                                  Members group by key (the name up to the first dot of its
                                  basename); the image member (.jpg .png .webp ...) + a .txt
                                  caption, or a .json one (caption=KEY, default "caption" then
                                  "text"). Uncompressed tars only (members are read by offset).
  tfds:NAME[/CONFIG][:VERSION]?data_dir=DIR | tfds:DATASET_DIR
                                  an already generated TFDS dataset, read from its files (no code,
                                  no download, no TensorFlow). Options: split (train), image
                                  (image), caption (the first of caption, captions/text, captions,
                                  text; "/" walks nested features), key (default "SPLIT/i").
  synthetic:N[?seed=S]            N examples of sdxl_jax.data.synthetic (default seed 0).
                                  ?colour=C[,C2]: only these colours; ?word=W: captions name
                                  the colour W instead (a new word to teach: DreamBooth).
                                  ?min_side=16&max_side=256: short side range in px (24..160);
                                  ?max_aspect=2 and ?square=0.2: long/short limit and share of
                                  squares; ?edge=0.04-0.26: the shape's outer edge in axis
                                  fractions from its border (0.22-0.26; lower: nearer borders).

Every kind also takes ?repeats=N (each record used N times per epoch, times a kohya folder's
N) and ?loss_weight=W (its loss weight: a class / regularisation set's prior-preservation
weight); the side index keeps both per record.

Several sources (``--source`` repeated) make one dataset: their records in turn, keys prefixed
with the source's number ("0/", "1/", ...) so equal names in two folders stay apart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode

import numpy as np

from sdxl_jax.data.folders import FolderSource
from sdxl_jax.data.readers import (
    ManifestSource,
    RawRecord,
    Source,
    SourceError,
    SyntheticSource,
    TfdsSource,
    WebDatasetSource,
    synthetic_size,
)

KINDS = ("folder", "jsonl", "csv", "parquet", "webdataset", "tfds", "synthetic")
COMMON_OPTIONS = ("repeats", "loss_weight")
_QUERY = re.compile(r"\w+=[^&]*(&\w+=[^&]*)*")
_OPTIONS = {
    "folder": ("caption_ext", "layout", "caption"),
    "jsonl": ("image", "caption", "key", "root"),
    "csv": ("image", "caption", "key", "root"),
    "parquet": ("image", "caption", "key", "root"),
    "webdataset": ("caption",),
    "tfds": ("split", "image", "caption", "key", "data_dir"),
    "synthetic": ("seed", "colour", "word", "min_side", "max_side", "max_aspect", "square", "edge"),
}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``KIND:LOCATION[?k=v&...]`` -> (kind, location, options), checked against KINDS."""
    example = "e.g. folder:/data/images or webdataset:shards-{000..009}.tar"
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise SourceError(f"--source must be KIND:LOCATION ({example}); got {spec!r}")
    if kind not in KINDS:
        raise SourceError(f"unknown source kind {kind!r} in {spec!r}; choose one of {KINDS}")
    # Options follow the last "?" when they read k=v&k=v; other "?" are glob wildcards.
    location, query = rest, ""
    if _QUERY.fullmatch(rest.rpartition("?")[2]) and "?" in rest:
        location, _, query = rest.rpartition("?")
    if not location:
        raise SourceError(f"source {spec!r} names no location: give {kind}:LOCATION ({example})")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS[kind]) - set(COMMON_OPTIONS))
    if unknown:
        allowed = _OPTIONS[kind] + COMMON_OPTIONS
        raise SourceError(f"{kind} sources take options {allowed}, not {unknown}")
    return kind, location, options


def is_spec(text: str) -> bool:
    """Whether ``text`` names a source (``KIND:LOCATION``) rather than a path."""
    return text.partition(":")[0] in KINDS


def with_options(spec: str, **options: object) -> str:
    """``spec`` with ``options`` appended to its query (``?k=v`` or ``&k=v``)."""
    return spec + ("&" if "?" in spec else "?") + urlencode(options)


def open_source(spec: str) -> Source:
    """The source named by ``spec`` (see the module docstring), listed and ready to load."""
    kind, location, options = parse_spec(spec)
    cls = {
        "folder": FolderSource,
        "jsonl": ManifestSource,
        "csv": ManifestSource,
        "parquet": ManifestSource,
        "webdataset": WebDatasetSource,
        "tfds": TfdsSource,
        "synthetic": SyntheticSource,
    }[kind]
    common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
    source = cls(kind, location, options)
    return Scaled(source, common) if common else source


def _number(options: dict[str, str], name: str, default: float) -> float:
    text = options.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise SourceError(f"?{name}={text!r}: give a number >= 0")
    return value


class Scaled(Source):
    """A source whose records are used ``repeats`` times as often, with ``loss_weight``."""

    def __init__(self, inner: Source, options: dict[str, str]):
        super().__init__(inner.kind, inner.location, {**inner.options, **options})
        self.inner = inner
        self.spec = with_options(inner.spec, **options)
        self.repeats = _number(options, "repeats", 1)
        if self.repeats != int(self.repeats) or self.repeats < 1:
            raise SourceError(f"?repeats={options['repeats']!r}: give a whole number >= 1")
        self.loss_weight = _number(options, "loss_weight", 1.0)

    def __len__(self) -> int:
        return len(self.inner)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def load(self, i: int) -> RawRecord:
        raw = self.inner.load(i)
        return dataclasses.replace(
            raw,
            repeats=raw.repeats * int(self.repeats),
            loss_weight=raw.loss_weight * self.loss_weight,
        )


class MultiSource(Source):
    """Several sources as one: their records in turn, keys prefixed with the source number."""

    def __init__(self, parts: list[Source]):
        super().__init__("multi", " + ".join(p.spec for p in parts), {})
        self.spec = self.location
        self.options = {"sources": [[p.spec, p.options] for p in parts]}
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def fingerprint(self) -> str:
        return "+".join(p.fingerprint() for p in self.parts)

    def load(self, i: int) -> RawRecord:
        j = int(np.searchsorted(self.starts, i, side="right")) - 1
        raw = self.parts[j].load(i - int(self.starts[j]))
        return dataclasses.replace(raw, key=f"{j}/{raw.key}")


def open_sources(specs: str | Sequence[str]) -> Source:
    """One source, or several as one (``MultiSource``), from their specs."""
    if isinstance(specs, str):
        return open_source(specs)
    if not specs:
        raise SourceError("no --source given: name at least one KIND:LOCATION")
    parts = [open_source(spec) for spec in specs]
    return parts[0] if len(parts) == 1 else MultiSource(parts)


def parse_synthetic(spec: str) -> tuple[int, int]:
    """``synthetic:N[?seed=S]`` -> (N, S), S defaulting to 0; ``SourceError`` names the form."""
    kind, location, options = parse_spec(spec)
    if kind != "synthetic":
        raise SourceError(f"{spec!r} is not a synthetic source: give synthetic:N[?seed=S]")
    return synthetic_size(location, options)
