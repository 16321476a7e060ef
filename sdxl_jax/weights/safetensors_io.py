"""Streaming safetensors reading and writing, one tensor at a time.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
(plus an optional ``__metadata__`` str -> str map), then the raw little-endian data.

Reading is ours: the header is parsed and every entry checked before any tensor is read (known
dtype, shape a list of non-negative ints, offsets inside the file, ``end - begin == numel x
itemsize``, tensors tiling the data with no overlap and no gap), as the ``safetensors`` library
checks them; a bad file is refused in one line naming the file, the tensor and what is wrong.
A tensor is then read at its header offsets into a buffer of its own only when asked for, so
loading a checkpoint never holds more than the tensor in flight beyond the parameters being built
(an mmap would keep every page read resident until the file is closed). bf16 and float8 arrive as
``ml_dtypes`` types.

Writing is ours too: ``safetensors.numpy.save_file`` needs every tensor in memory at once, while
``write_safetensors`` produces each tensor just before writing it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
# Valid safetensors dtypes (sub-byte or exotic floats) that no SDXL checkpoint uses: refused.
UNSUPPORTED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class HeaderError(ValueError):
    """A safetensors header that is not what the format allows (one line, no file name yet)."""


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"key {k!r} appears twice in one JSON object")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise HeaderError(f"header holds {name}, which is not JSON")


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"header is not UTF-8 ({e})") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise HeaderError(f"header is not JSON ({e})") from None


def _check_entry(key: str, entry: Any, data_len: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end), each field checked; offsets count from the data."""
    where = f"tensor {key!r}:"
    if not isinstance(entry, dict):
        raise HeaderError(
            f"{where} entry is a {type(entry).__name__}, not {{{', '.join(_FIELDS)}}}"
        )
    missing = [f for f in _FIELDS if f not in entry]
    if missing:
        raise HeaderError(f"{where} no {' or '.join(missing)} (needs {', '.join(_FIELDS)})")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code in UNSUPPORTED_DTYPES:
        raise HeaderError(f"{where} dtype {code} is valid safetensors but sdxl_jax cannot read it")
    if not isinstance(code, str) or code not in DTYPES:
        raise HeaderError(f"{where} unknown dtype {code!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(f"{where} shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise HeaderError(f"{where} data_offsets {offsets!r} are not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise HeaderError(f"{where} data_offsets {offsets} are reversed (begin > end)")
    if end > data_len:
        raise HeaderError(
            f"{where} data_offsets {offsets} run past the end of the file (truncated? it has "
            f"{data_len} bytes of data after the header)"
        )
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if end - begin != nbytes:
        raise HeaderError(
            f"{where} shape {shape} x {code} is {nbytes} bytes but data_offsets {offsets} "
            f"span {end - begin}"
        )
    return dtype, tuple(shape), begin, end


def _check_tiling(spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors cover the data exactly: sorted by offset, each starts where the last ended."""
    pos, last = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise HeaderError(
                f"tensor {key!r}: data_offsets [{begin}, {end}] overlap tensor {last[2]!r} "
                f"[{last[0]}, {last[1]}]"
            )
        if begin > pos:
            raise HeaderError(
                f"tensor {key!r}: data bytes [{pos}, {begin}) before it belong to no tensor"
            )
        pos, last = end, (begin, end, key)
    if pos != data_len:
        raise HeaderError(
            f"the last {data_len - pos} bytes of data belong to no tensor (file not fully covered)"
        )


def parse_header(raw: bytes, data_len: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The metadata and tensors of a header of ``raw`` bytes, followed by ``data_len`` bytes of
    data; raises ``HeaderError`` for anything the format does not allow."""
    header = _parse_json(raw)
    if not isinstance(header, dict):
        raise HeaderError(f"header is a JSON {type(header).__name__}, not an object of tensors")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError("__metadata__ is not a map of strings to strings")
    start = 8 + len(raw)
    tensors, spans = {}, []
    for key, entry in header.items():
        dtype, shape, begin, end = _check_entry(key, entry, data_len)
        tensors[key] = TensorInfo(dtype, shape, start + begin, end - begin)
        spans.append((begin, end, key))
    _check_tiling(spans, data_len)
    return meta, tensors


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The checked header of the safetensors file at ``path``; no tensor is read."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            if size < 8:
                raise HeaderError(f"{size} bytes: too short to hold a header length (8 bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise HeaderError(
                    f"header length {n} is more than the {size - 8} bytes after it (truncated?)"
                )
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"header length {n} is over safetensors' {MAX_HEADER_BYTES}")
            return parse_header(f.read(n), size - 8 - n)
        except HeaderError as e:
            raise HeaderError(f"{path}: not a safetensors file, or a corrupt one: {e}") from None


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file, without reading the others."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata, self.tensors = read_header(self.path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        """The tensor, read at the header's offsets into an array of its own."""
        info = self.tensors[key]
        count = int(np.prod(info.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(info.shape, info.dtype)
        arr = np.fromfile(self.path, dtype=info.dtype, count=count, offset=info.offset)
        if arr.size != count:
            raise ValueError(f"{self.path}: tensor {key!r} is truncated (the file shrank?)")
        return arr.reshape(info.shape)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its shape and dtype now, its values only when written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def spec_of(array: np.ndarray) -> TensorSpec:
    return TensorSpec(tuple(array.shape), np.dtype(array.dtype), lambda: array)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, TensorSpec],
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
) -> None:
    """Write tensors one by one (each produced just before it is written), atomically."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, spec in tensors.items():
        if np.dtype(spec.dtype) not in NAMES:
            raise ValueError(f"cannot write tensor {key!r} of dtype {spec.dtype}")
        header[key] = {
            "dtype": NAMES[np.dtype(spec.dtype)],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    bar = tqdm(
        total=offset,
        unit="B",
        unit_scale=True,
        desc=f"writing {path.parent.name}/{path.name}",
        disable=not progress,
    )
    with open(tmp, "wb") as f, bar:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, spec in tensors.items():
            arr = np.asarray(spec.produce(), dtype=spec.dtype)
            arr = np.ascontiguousarray(arr) if arr.ndim else arr  # a 0-d stays 0-d
            if tuple(arr.shape) != tuple(spec.shape):
                raise ValueError(f"tensor {key!r}: produced {arr.shape}, declared {spec.shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)  # raw bytes, no copy (bf16 too)
            bar.update(arr.nbytes)
    os.replace(tmp, path)


def write_sharded(
    folder: str | os.PathLike,
    stem: str,
    tensors: Mapping[str, TensorSpec],
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Write ``<stem>.safetensors``, or shards plus ``<stem>.safetensors.index.json`` (HF)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, TensorSpec]] = [{}]
    size = 0
    for key, spec in tensors.items():
        if max_shard_bytes and shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = spec
        size += spec.nbytes
    if len(shards) == 1:
        name = f"{stem}.safetensors"
        write_safetensors(folder / name, shards[0], metadata, progress)
        return [name]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(folder / name, shard, metadata, progress)
        weight_map.update({k: name for k in shard})
    total = sum(s.nbytes for s in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


class TensorSource:
    """Named tensors from one or more safetensors files (a sharded checkpoint's index included)."""

    def __init__(self, files: Iterable[SafetensorsFile], description: str):
        self.description = description
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for key in f.keys():
                if key in self._where:
                    raise ValueError(
                        f"{description}: tensor {key!r} is in both {self._where[key].path.name} "
                        f"and {f.path.name}: which one is meant?"
                    )
                self._where[key] = f

    @classmethod
    def open(cls, path: str | os.PathLike) -> TensorSource:
        """A ``.safetensors`` file or a ``.safetensors.index.json`` index of shards."""
        path = Path(path)
        if not path.name.endswith(".index.json"):
            return cls([SafetensorsFile(path)], str(path))
        weight_map = read_index(path)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path.parent / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard {missing[0]} is missing beside it")
        source = cls([SafetensorsFile(path.parent / n) for n in names], str(path))
        for key, name in weight_map.items():
            if key not in source or source._where[key].path.name != name:
                raise ValueError(f"{path}: names {name} for tensor {key!r}, which it does not hold")
        return source

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the file holding the first tensor (``{}`` if none)."""
        return self._where[next(iter(self._where))].metadata if self._where else {}

    def keys(self) -> list[str]:
        return list(self._where)

    @property
    def paths(self) -> list[Path]:
        """The files holding the tensors, each once, in the order first seen."""
        return list(dict.fromkeys(f.path for f in self._where.values()))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].tensors[key].shape

    def info(self, key: str) -> TensorInfo:
        return self._where[key].tensors[key]

    def read(self, key: str) -> np.ndarray:
        return self._where[key].read(key)


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file beside the index) of a sharded checkpoint."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON index of shards ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path}: no weight_map of tensor names to shard file names")
    for name in set(weight_map.values()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{path}: shard {name!r} is not a file name beside the index")
    return weight_map
