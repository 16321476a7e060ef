"""Streaming safetensors reading and writing, one tensor at a time.

Reading goes through ``safetensors.safe_open`` (numpy, ``pread`` backend): keys, shapes and dtypes
come from the header alone, and a tensor is read into a buffer of its own only when asked for, so
loading a checkpoint never holds more than the tensor in flight beyond the parameters being built.
(The default ``mmap`` backend would keep every page read resident until the file is closed: a
whole shard on top of the parameters.) bf16 arrives as ``ml_dtypes.bfloat16``. safetensors' numpy
reader knows no float8, so F8 tensors are read here, at the offset the header implies.

Writing is ours: ``safetensors.numpy.save_file`` needs every tensor in memory at once, while
``write_safetensors`` produces each tensor just before writing it. Format: 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # registers bfloat16 with numpy: safe_open's bf16 tensors need it
import numpy as np
from safetensors import SafetensorError, safe_open
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
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
_NO_NUMPY_NAME = ("F8_E4M3", "F8_E5M2")  # safe_open's numpy reader lacks them


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file, without reading the others."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            # Checks the header: JSON, known dtypes, offsets contiguous and covering the file.
            self._file = safe_open(self.path, framework="numpy", backend="pread")
        except SafetensorError as e:
            raise ValueError(f"{self.path}: not a safetensors file, or truncated ({e})") from None
        self.metadata: dict[str, str] = self._file.metadata() or {}
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        offset = 8 + n  # the data follows the header, tensor after tensor
        self.tensors: dict[str, TensorInfo] = {}
        for key in self._file.offset_keys():
            view = self._file.get_slice(key)
            code = view.get_dtype()
            if code not in DTYPES:
                raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {code}")
            shape = tuple(view.get_shape())
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
            self.tensors[key] = TensorInfo(DTYPES[code], shape, offset, nbytes)
            offset += nbytes

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        if NAMES[info.dtype] not in _NO_NUMPY_NAME:
            try:
                return self._file.get_tensor(key)
            except SafetensorError as e:
                raise ValueError(f"{self.path}: tensor {key!r} cannot be read ({e})") from None
        count = int(np.prod(info.shape, dtype=np.int64))
        arr = np.fromfile(self.path, dtype=info.dtype, count=count, offset=info.offset)
        if arr.size != count:
            raise ValueError(f"{self.path}: tensor {key!r} is truncated")
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
                self._where[key] = f

    @classmethod
    def open(cls, path: str | os.PathLike) -> TensorSource:
        """A ``.safetensors`` file or a ``.safetensors.index.json`` index of shards."""
        path = Path(path)
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            names = sorted(set(index["weight_map"].values()))
            return cls([SafetensorsFile(path.parent / n) for n in names], str(path))
        return cls([SafetensorsFile(path)], str(path))

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
