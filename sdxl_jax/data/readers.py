"""One reader per source format behind the ``Source`` interface; ``sdxl_jax.data.sources``
names them (``KIND:LOCATION[?key=value&...]``) and says what each reads.

Every source lists its records once, in a fixed order (so an interrupted build resumes on the same
record numbering), and then loads record i on demand, in any process: the objects are small and
picklable (lists of paths / offsets), and file handles are opened lazily per process.
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
)  # fmt: skip
IMAGE_COLUMNS = ("image", "file_name", "path", "image_path", "filename", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt", "captions")
TFDS_CAPTIONS = ("caption", "captions/text", "captions", "text")


class SourceError(ValueError):
    """A source spec or location that cannot be used; the message names the fix."""


class RecordError(Exception):
    """One record that cannot be read; ``reason`` is a prepare skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class RawRecord:
    """One source record as read: the encoded image (or a uint8 [H, W, C] array from a TFDS
    Tensor feature) and its captions (None: the source has no caption for it); how often it
    is used per epoch (``repeats``) and the weight of its loss (``loss_weight``)."""

    key: str
    data: bytes | np.ndarray
    captions: list[str] | None
    repeats: int = 1
    loss_weight: float = 1.0


class Source:
    """Base: ``len(source)`` records, ``source.load(i) -> RawRecord`` (raises RecordError)."""

    def __init__(self, kind: str, location: str, options: dict[str, str]):
        self.kind, self.location, self.options = kind, location, options
        self.spec = f"{kind}:{location}"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> RawRecord:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes when the listing changes, so a resumed build can refuse stale staging."""
        return f"{len(self)}"

    def __getstate__(self) -> dict[str, Any]:
        # Open handles and caches stay in the process that made them.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache")}


def why_unusable(path: Path, want: str) -> str:
    """Why ``path`` is not the ``want`` ("directory" / "file") it should be, in a few words."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop (the link leads back to itself)"
        if path.is_symlink():
            return f"is a broken symlink (to {os.readlink(path)}, which does not exist)"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({e.strerror})"
    return f"is not a {want}"


def _read_file(path: Path, what: str = "image") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"missing_{what}", f"{path} does not exist") from None
    except OSError as e:
        raise RecordError("read_error", f"{path}: {e}") from None


def _text(data: bytes) -> str:
    return data.decode("utf-8-sig", errors="replace")


def _caption_text(data: bytes, where: str = "caption") -> str:
    """A caption's bytes as text; not UTF-8 is a skip reason (``caption_not_utf8``), counted in
    the report, rather than a caption with replacement characters trained on silently."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecordError(
            "caption_not_utf8", f"{where}: not UTF-8 at byte {e.start}; re-encode it as UTF-8"
        ) from None


def _captions(value: Any) -> list[str] | None:
    """A caption cell -> list of captions (None when absent)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return [_caption_text(value)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, np.ndarray | list | tuple):
        return [c for v in value for c in (_captions(v) or [])]
    return [str(value)]


def _digest(items: list[str]) -> str:
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# jsonl / csv / parquet manifests
# ---------------------------------------------------------------------------------------------


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise SourceError(f"manifest has no {what} column {wanted!r}; it has {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise SourceError(
        f"manifest has none of the default {what} columns {defaults}; it has {columns}: "
        f"name one with ?{what}=COLUMN"
    )


class ManifestSource(Source):
    """Rows of a jsonl / csv / parquet manifest. Image paths are read in ``load``; parquet
    image bytes stay on disk and are read a row group at a time."""

    def __init__(self, kind: str, location: str, options: dict[str, str]):
        super().__init__(kind, location, options)
        self.path = Path(location).expanduser()
        if not self.path.is_file():
            raise SourceError(f"{kind} manifest {location!r} {why_unusable(self.path, 'file')}")
        self.root = Path(options.get("root", self.path.parent)).expanduser()
        rows, columns = self._read_rows()  # rows: dict per row, or an error string (bad line)
        if not columns:
            raise SourceError(f"{kind} manifest {location!r} has no rows")
        self.image_col = _pick(columns, options.get("image"), IMAGE_COLUMNS, "image")
        self.caption_col = _pick(columns, options.get("caption"), CAPTION_COLUMNS, "caption")
        key_col = options.get("key", "key" if "key" in columns else None)
        if key_col is not None:
            _pick(columns, key_col, (), "key")
        self.rows: list[tuple[str, str | None, list[str] | None] | str] = []
        for n, row in enumerate(rows):
            if isinstance(row, str):
                self.rows.append(row)
                continue
            image = row.get(self.image_col)
            path = image.get("path") if isinstance(image, dict) else image
            path = path if isinstance(path, str) else None
            key = row.get(key_col) if key_col else path
            key = str(key) if key not in (None, "") else f"row{n:09d}"
            self.rows.append((key, path, _captions(row.get(self.caption_col))))

    def _read_rows(self) -> tuple[list[dict | str], list[str]]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path)
            names = pf.schema_arrow.names
            image_col = _pick(names, self.options.get("image"), IMAGE_COLUMNS, "image")
            self.inline = self._parquet_inline(pf.schema_arrow.field(image_col).type)
            columns = [c for c in names if c != image_col or not self.inline]
            table = pf.read(columns=columns)
            rows = table.to_pylist()
            if self.inline:  # bytes stay on disk; keep a struct's path for the key
                paths = self._parquet_paths(pf, image_col)
                for row, path in zip(rows, paths, strict=True):
                    row[image_col] = path
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self.row_groups = np.cumsum([0] + sizes)  # row group g: rows [rg[g], rg[g + 1])
            return rows, names
        self.inline = False
        text = _text(self.path.read_bytes())
        if self.kind == "csv":
            reader = csv.DictReader(io.StringIO(text))
            return list(reader), list(reader.fieldnames or [])
        rows: list[dict | str] = []
        columns: dict[str, None] = {}
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                columns.update(dict.fromkeys(row))
                rows.append(row)
            except ValueError as e:
                rows.append(f"line {n + 1}: {e}")
        return rows, list(columns)

    @staticmethod
    def _parquet_inline(dtype: Any) -> bool:
        import pyarrow as pa

        if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
            return True
        return pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0

    @staticmethod
    def _parquet_paths(pf: Any, image_col: str) -> list[str | None]:
        import pyarrow as pa

        if not pa.types.is_struct(pf.schema_arrow.field(image_col).type):
            return [None] * pf.metadata.num_rows
        if pf.schema_arrow.field(image_col).type.get_field_index("path") < 0:
            return [None] * pf.metadata.num_rows
        paths: list[str | None] = []
        for g in range(pf.num_row_groups):  # one row group of bytes in memory at a time
            column = pf.read_row_group(g, columns=[image_col]).column(0).combine_chunks()
            paths += column.field("path").to_pylist()
        return paths

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self) -> str:
        return _digest([r if isinstance(r, str) else f"{r[0]}\t{r[1]}" for r in self.rows])

    def load(self, i: int) -> RawRecord:
        row = self.rows[i]
        if isinstance(row, str):
            raise RecordError("read_error", f"{self.path} {row}")
        key, path, captions = row
        if self.inline:
            data = self._parquet_bytes(i)
        elif path is None:
            raise RecordError("missing_image", f"{self.path} row {i} has no {self.image_col}")
        else:
            data = _read_file(self.root / path)
        return RawRecord(key, data, captions)

    def _parquet_bytes(self, i: int) -> bytes:
        import pyarrow.parquet as pq

        g = int(np.searchsorted(self.row_groups, i, side="right")) - 1
        cached = getattr(self, "_cache_group", None)
        if cached is None or cached[0] != g:
            pf = pq.ParquetFile(self.path)
            column = pf.read_row_group(g, columns=[self.image_col]).column(0).to_pylist()
            self._cache_group = cached = (g, column)
        cell = cached[1][i - int(self.row_groups[g])]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None:
            path = cell.get("path") if isinstance(cell, dict) else None
            if path is None:
                raise RecordError("missing_image", f"{self.path} row {i} holds no image bytes")
            return _read_file(self.root / path)
        return data


# ---------------------------------------------------------------------------------------------
# webdataset
# ---------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b{x,y}`` -> [a0bx, a0by, a1bx, ...]; ranges keep the start's zero padding."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        parts = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def _member_key(name: str) -> tuple[str, str]:
    """webdataset's split: ``dir/abc.seg.png`` -> ("dir/abc", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class WebDatasetSource(Source):
    def __init__(self, kind: str, location: str, options: dict[str, str]):
        super().__init__(kind, location, options)
        self.caption_key = options.get("caption")
        self.shards: list[str] = []
        for pattern in expand_braces(os.path.expanduser(location)):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            self.shards += [m for m in matches if m not in self.shards]
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if not self.shards or missing:
            raise SourceError(f"webdataset shards not found: {missing or location!r}")
        # record: (key, shard index, (offset, size, ext) of the image member or None, same for
        # the caption, (reason, detail) when the shard itself is unreadable there)
        self.records: list[tuple[str, int, tuple | None, tuple | None, tuple | None]] = []
        for s, shard in enumerate(self.shards):
            self._list_shard(s, shard)

    def _list_shard(self, s: int, shard: str) -> None:
        try:
            tar = tarfile.open(shard, mode="r:")
        except (tarfile.TarError, OSError) as e:
            with open(shard, "rb") as f:
                head = f.read(4)
            if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zX", b"\x28\xb5\x2f\xfd")):
                raise SourceError(
                    f"{shard} is a compressed tar; members are read by offset, so decompress the "
                    f"shards first (gunzip / bunzip2 / unxz / unzstd)"
                ) from None
            self.records.append((shard, s, None, None, ("read_error", f"not a tar: {e}")))
            return
        groups: dict[str, dict[str, tuple[int, int, str]]] = {}
        error = None
        with tar:
            try:
                for m in tar:
                    if m.isfile():
                        key, ext = _member_key(m.name)
                        groups.setdefault(key, {})[ext] = (m.offset_data, m.size, ext)
            except tarfile.TarError as e:  # the rest of the shard is lost: one bad record
                error = ("truncated", f"{shard}: tar unreadable after {len(groups)} keys: {e}")
        for key, members in groups.items():
            image = next((v for e, v in members.items() if f".{e}" in IMAGE_EXTENSIONS), None)
            caption = members.get("txt") or members.get("json")
            self.records.append((key, s, image, caption, None))
        if error is not None:
            self.records.append((f"{shard}:rest", s, None, None, error))

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        return _digest([f"{r[0]}\t{r[1]}" for r in self.records])

    def _read(self, s: int, offset: int, size: int) -> bytes:
        cached = getattr(self, "_cache_file", None)
        if cached is None or cached[0] != s:
            if cached is not None:
                cached[1].close()
            self._cache_file = cached = (s, open(self.shards[s], "rb"))  # noqa: SIM115
        cached[1].seek(offset)
        data = cached[1].read(size)
        if len(data) != size:
            raise RecordError("truncated", f"{self.shards[s]} ends inside a member")
        return data

    def load(self, i: int) -> RawRecord:
        key, s, image, caption, error = self.records[i]
        if error is not None:
            raise RecordError(*error)
        if image is None:
            raise RecordError("missing_image", f"{self.shards[s]}: {key} has no image member")
        try:
            data = self._read(s, image[0], image[1])
            captions = None
            if caption is not None:
                text = _caption_text(self._read(s, caption[0], caption[1]), f"{key}.{caption[2]}")
                captions = [text] if caption[2] == "txt" else self._json_captions(text)
        except OSError as e:
            raise RecordError("read_error", f"{self.shards[s]}: {key}: {e}") from None
        return RawRecord(key, data, captions)

    def _json_captions(self, text: str) -> list[str] | None:
        try:
            meta = json.loads(text)
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        for name in (self.caption_key,) if self.caption_key else ("caption", "text"):
            if name in meta:
                return _captions(meta[name])
        return None


# ---------------------------------------------------------------------------------------------
# tfds
# ---------------------------------------------------------------------------------------------


def _feature_at(features: Any, path: str) -> Any | None:
    """The feature connector at "a/b" in a FeaturesDict (through Sequences), or None."""
    import tensorflow_datasets as tfds

    for part in path.split("/"):
        while isinstance(features, tfds.features.Sequence):
            features = features.feature
        if not isinstance(features, tfds.features.FeaturesDict) or part not in features:
            return None
        features = features[part]
    return features


def _value_at(example: Any, path: str) -> Any:
    for part in path.split("/"):
        example = example[part]
    return example


class TfdsSource(Source):
    def __init__(self, kind: str, location: str, options: dict[str, str]):
        import tensorflow_datasets as tfds

        super().__init__(kind, location, options)
        self.split = options.get("split", "train")
        builder = self._builder()
        features = builder.info.features
        if self.split not in builder.info.splits:
            raise SourceError(
                f"{location!r} has no split {self.split!r}: {list(builder.info.splits)}"
            )
        self.n = builder.info.splits[self.split].num_examples
        self.image = options.get("image", "image")
        if _feature_at(features, self.image) is None:
            raise SourceError(f"{location!r} has no feature {self.image!r}: ?image=PATH names it")
        wanted = (options["caption"],) if "caption" in options else TFDS_CAPTIONS
        found = [p for p in wanted if _feature_at(features, p) is not None]
        if not found:
            raise SourceError(
                f"{location!r} has no caption feature {wanted}: ?caption=PATH names it "
                f"('/' walks nested features, e.g. captions/text); features: {list(features)}"
            )
        self.caption, self.key = found[0], options.get("key")
        self.image_is_encoded = isinstance(_feature_at(features, self.image), tfds.features.Image)

    def _builder(self) -> Any:
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import read_only_builder

        try:
            if (
                "data_dir" not in self.options
                and (Path(self.location) / "dataset_info.json").exists()
            ):
                return tfds.builder_from_directory(self.location)
            data_dir = self.options.get("data_dir")
            return read_only_builder.builder_from_files(self.location, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 (tfds raises many kinds; all mean "not found")
            raise SourceError(
                f"no generated TFDS dataset at {self.location!r} (data_dir="
                f"{self.options.get('data_dir')}): {str(e).splitlines()[0]}. Nothing is downloaded "
                f"here: generate it first, then give tfds:NAME?data_dir=DIR or tfds:DATASET_DIR"
            ) from None

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        return f"{self.n}:{self.split}"

    def _source(self) -> Any:
        cached = getattr(self, "_cache_source", None)
        if cached is None:
            import tensorflow_datasets as tfds

            decoders: dict[str, Any] = {}
            if self.image_is_encoded:  # nested dict down to the image: {"a": {"b": Skip}}
                *parents, leaf = self.image.split("/")
                node = decoders
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = tfds.decode.SkipDecoding()
            cached = self._builder().as_data_source(self.split, decoders=decoders or None)
            self._cache_source = cached
        return cached

    def load(self, i: int) -> RawRecord:
        example = self._source()[i]
        data = _value_at(example, self.image)
        key = _value_at(example, self.key) if self.key else f"{self.split}/{i}"
        key = _text(key) if isinstance(key, bytes) else str(key)
        return RawRecord(key, data, _captions(_value_at(example, self.caption)))


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def synthetic_size(location: str, options: dict[str, str]) -> tuple[int, int]:
    """(N, seed) of ``synthetic:N[?seed=S]``, split by ``sources.parse_spec``; checked."""
    try:
        n, seed = int(location), int(options.get("seed", 0))
    except ValueError:
        spec = f"synthetic:{location}"
        raise SourceError(
            f"synthetic source needs synthetic:N[?seed=S] with integers, got {spec!r}"
        ) from None
    if n <= 0:
        raise SourceError(f"synthetic:N needs N > 0, got {n}")
    return n, seed


# ``synthetic:`` options that shape the images: (example() keyword, parser, example value).
SYNTHETIC_SHAPE_OPTIONS = {
    "min_side": ("min_side", int, "16"),
    "max_side": ("max_side", int, "256"),
    "max_aspect": ("max_aspect", float, "2"),
    "square": ("square_fraction", float, "0.2"),
    "edge": ("edge_range", lambda t: tuple(float(v) for v in t.split("-", 1)), "0.04-0.26"),
}


def synthetic_shape_options(options: dict[str, str]) -> dict[str, Any]:
    """``synthetic.example`` keywords from ``?min_side=16&max_side=256&max_aspect=2&square=0.2
    &edge=0.04-0.26`` (short side range in px, long/short limit, share of squares, the shape's
    outer edge in axis fractions from its border); checked by rendering one example."""
    from sdxl_jax.data import synthetic

    kw = {}
    for name, (key, parse, example) in SYNTHETIC_SHAPE_OPTIONS.items():
        if name in options:
            try:
                kw[key] = parse(options[name])
            except ValueError:
                raise SourceError(
                    f"synthetic ?{name}={options[name]!r}: not a value like ?{name}={example}"
                ) from None
    if "edge_range" in kw and len(kw["edge_range"]) != 2:
        raise SourceError(f"synthetic ?edge={options['edge']!r}: give LO-HI, e.g. 0.04-0.26")
    if not 0 <= kw.get("square_fraction", 0.0) <= 1:
        raise SourceError(f"synthetic ?square={options['square']!r}: need a fraction in [0, 1]")
    try:
        synthetic.example(0, **kw)
    except ValueError as e:
        raise SourceError(f"synthetic options {options}: {e}") from None
    return kw


class SyntheticSource(Source):
    def __init__(self, kind: str, location: str, options: dict[str, str]):
        super().__init__(kind, location, options)
        self.n, self.seed = synthetic_size(location, options)
        self.spec = f"synthetic:{self.n}?seed={self.seed}"
        self.shape_options = synthetic_shape_options(options)
        self._shape_query = "".join(
            f"&{k}={options[k]}" for k in SYNTHETIC_SHAPE_OPTIONS if k in options
        )
        self.colours = tuple(c for c in options.get("colour", "").split(",") if c)
        self.word = options.get("word") or None
        from sdxl_jax.data import synthetic

        bad = [c for c in self.colours if c not in synthetic.COLOURS]
        if bad:
            raise SourceError(
                f"synthetic ?colour={bad[0]!r}: choose from {tuple(synthetic.COLOURS)}"
            )
        if self.word is not None and not re.fullmatch(r"[a-z]+", self.word):
            raise SourceError(f"synthetic ?word={self.word!r}: one lower-case word (a-z)")
        if self.colours or self.word:
            self.spec += f"&colour={','.join(self.colours)}&word={self.word or ''}"
        self.spec += self._shape_query

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        return f"{self.n}:{self.seed}:{','.join(self.colours)}:{self.word or ''}" + (
            f":{self._shape_query}" if self._shape_query else ""
        )

    def load(self, i: int) -> RawRecord:
        from sdxl_jax.data import synthetic

        # Example i depends only on (i, seed), so any process can make any record.
        options = {"colours": self.colours, "word": self.word, **self.shape_options}
        example = next(synthetic.examples(1, seed=self.seed, start=i, **options))
        return RawRecord(example["key"], example["image"], [example["caption"]])
