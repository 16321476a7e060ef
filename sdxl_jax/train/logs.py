"""Training logs: TensorBoard event files (no TensorFlow), a JSONL metrics file, the progress line.

The event file is written by hand: TFRecord framing (length, masked CRC-32C, data, masked
CRC-32C) around ``tensorboard.Event`` protos encoded in the protobuf wire format, so TensorBoard
reads it without this package depending on TensorFlow or on a protobuf version.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

# --- CRC-32C (Castagnoli) and TFRecord framing ------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (pure Python: ~0.1 s per MiB, fine for scalars and sample grids)."""
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


# --- protobuf wire format (only what the messages below need) ---------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> ten-byte two's complement, as protobuf does
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int_field(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes_field(field: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, summary_value: bytes = b"", version: str = "") -> bytes:
    """An ``Event``: wall_time = 1 (double), step = 2, file_version = 3, summary = 5."""
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _int_field(2, step)
    if version:
        msg += _bytes_field(3, version)
    if summary_value:  # Summary { repeated Value value = 1 }
        msg += _bytes_field(5, _bytes_field(1, summary_value))
    return msg


def _float32_le(value) -> bytes:
    with np.errstate(over="ignore"):  # 1e40 -> inf rather than an error: a log must not crash
        return np.asarray(float(value), dtype="<f4").tobytes()


# --- writers ----------------------------------------------------------------------------------


class EventWriter:
    """TensorBoard event file writer with no TensorFlow dependency.

    Records are buffered and flushed after every image or text, every ``flush_every`` scalars,
    or when ``flush_secs`` have passed since the last flush; ``close()`` flushes.
    """

    def __init__(self, logdir: str | Path, *, flush_every: int = 50, flush_secs: float = 10.0):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        base = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.sdxl_jax"
        self.path, n = self.logdir / base, 0
        while self.path.exists():  # a second writer in the same second: never interleave files
            n += 1
            self.path = self.logdir / f"{base}.{n}"
        self._file = open(self.path, "xb")
        self._flush_every, self._flush_secs = flush_every, flush_secs
        self._pending, self._last_flush = 0, time.monotonic()
        self._write(_event(now, 0, version="brain.Event:2"), flush=True)

    def _write(self, event: bytes, flush: bool = False) -> None:
        self._file.write(_record(event))
        self._pending += 1
        late = time.monotonic() - self._last_flush >= self._flush_secs
        if flush or late or self._pending >= self._flush_every:
            self.flush()

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """A float32 ``simple_value`` (non-finite values are kept: TensorBoard shows them)."""
        value_msg = _bytes_field(1, tag) + _varint(2 << 3 | 5) + _float32_le(value)
        wall = time.time() if wall_time is None else float(wall_time)
        self._write(_event(wall, int(step), summary_value=value_msg))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 image, [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], stored as PNG."""
        img = np.asarray(image)
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        ok_shape = img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))
        if img.dtype != np.uint8 or not ok_shape:
            raise ValueError(
                f"image {tag!r}: expected uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got "
                f"{img.dtype} {list(img.shape)}; convert with "
                "np.clip(np.round(x * 255), 0, 255).astype(np.uint8)"
            )
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        h, w = img.shape[:2]
        channels = 1 if img.ndim == 2 else img.shape[-1]  # Summary.Image colorspace: 1, 3 or 4
        image_msg = (
            _int_field(1, h) + _int_field(2, w) + _int_field(3, channels)
            + _bytes_field(4, png.getvalue())
        )  # fmt: skip
        value_msg = _bytes_field(1, tag) + _bytes_field(4, image_msg)
        self._write(_event(time.time(), int(step), summary_value=value_msg), flush=True)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text for TensorBoard's text plugin (a scalar DT_STRING tensor)."""
        # SummaryMetadata { plugin_data = 1 { plugin_name = 1 }, data_class = 4 (TENSOR = 2) }
        metadata = _bytes_field(1, _bytes_field(1, "text")) + _int_field(4, 2)
        # TensorProto { dtype = 1 (DT_STRING = 7), tensor_shape = 2 (scalar), string_val = 8 }
        tensor = _int_field(1, 7) + _bytes_field(2, b"") + _bytes_field(8, text)
        value_msg = _bytes_field(1, tag) + _bytes_field(9, metadata) + _bytes_field(8, tensor)
        self._write(_event(time.time(), int(step), summary_value=value_msg), flush=True)

    def flush(self) -> None:
        self._file.flush()
        self._pending, self._last_flush = 0, time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_number(value) -> float | int | None:
    """A JSON-safe scalar: ints stay ints, NaN and infinities become null (JSON has neither)."""
    a = np.asarray(value).reshape(())  # numpy / jax scalars and size-1 arrays
    if a.dtype.kind in "biu":
        return int(a)
    x = float(a)
    return x if math.isfinite(x) else None


class JsonlWriter:
    """One JSON object per line: ``{"step": int, "time": unix float, **scalars}``.

    Appends (a resumed run continues the file, so a step may appear twice: the later line wins)
    and flushes every line, so the file is current even if the job is killed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                partial = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")
        if partial:  # a killed run may have left half a line: start on a fresh one
            self._file.write("\n")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if "step" in scalars or "time" in scalars:
            raise ValueError(f"scalar names 'step' and 'time' are reserved, got {list(scalars)}")
        row = {"step": int(step), "time": time.time()}
        row.update({k: _json_number(v) for k, v in scalars.items()})
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --- the progress line ------------------------------------------------------------------------

_UNITS = {"_ms": "ms", "_s": "s", "_gib": "GiB"}  # scalar-name suffix -> unit printed


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}"


def _sig3(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"  # 3 significant digits, no 1.23e+03


def _scalar_text(name: str, value) -> str:
    x = float(value)
    if name == "lr" or name.endswith("_lr"):
        return f"{name} {x:.1e}"
    for suffix, unit in _UNITS.items():
        if name.endswith(suffix):
            return f"{name[: -len(suffix)]} {_sig3(x)} {unit}"
    if x.is_integer() and abs(x) < 1e15:  # counts (skipped steps, ...) print as integers
        return f"{name} {int(x)}"
    return f"{name} {x:.4g}"


class Progress:
    """The human progress line for a training stage.

    Create it just before the first train step: the first ``update`` (which includes the
    compilation) is reported once as the compile time and left out of the rates. Rates are
    measured over the last ``window_s`` seconds; ``step`` is the number of steps done.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        global_batch: int,
        *,
        stream=sys.stderr,
        stage: str = "",
        min_interval_s: float = 0.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.start, self.batch = int(total_steps), int(start_step), int(global_batch)
        self.stream, self.stage = stream, stage
        self.min_interval_s, self.window_s, self.clock = min_interval_s, window_s, clock
        self._t0 = clock()
        self._first: tuple[float, int] | None = None  # (time, step) at the end of the compile step
        self._recent: deque[tuple[float, int]] = deque()  # (time, step) over the rate window
        self._last_print = -math.inf

    def _rate(self) -> float | None:
        (t_a, s_a), (t_b, s_b) = self._recent[0], self._recent[-1]
        return (s_b - s_a) / (t_b - t_a) if len(self._recent) > 1 and t_b > t_a else None

    def update(
        self, step: int, scalars: Mapping[str, float], bucket: tuple[int, int] | None = None
    ) -> str:
        """Record ``step`` and print the line unless one was printed under ``min_interval_s``
        ago (the first and the final step always print). Returns the line, or "" if none."""
        now, step = self.clock(), int(step)
        first = self._first is None
        if first:
            self._first = (now, step)
        self._recent.append((now, step))
        # Keep one point at least window_s old, so the rate spans the whole window.
        while len(self._recent) > 2 and self._recent[1][0] <= now - self.window_s:
            self._recent.popleft()
        if not (first or step >= self.total or now - self._last_print >= self.min_interval_s):
            return ""
        self._last_print = now

        head = f"step {step}/{self.total} ({100 * step / max(self.total, 1):.1f}%)"
        parts = [f"[{self.stage}] {head}" if self.stage else head]
        rate = self._rate()
        if first:
            parts.append(f"first step (compile) {now - self._t0:.1f} s")
        elif rate is not None:
            parts.append(f"{_sig3(rate)} step/s {_sig3(rate * self.batch)} img/s")
            if rate > 0:
                parts.append(f"ETA {_hms(max(self.total - step, 0) / rate)}")
        if bucket is not None:
            parts.append(f"bucket {int(bucket[0])}x{int(bucket[1])}")
        if scalars:
            parts.append(" ".join(_scalar_text(k, v) for k, v in scalars.items()))
        line = " | ".join(parts)
        if self.stream is not None:
            self.stream.write(line + "\n")
            self.stream.flush()
        return line

    def summary(self) -> dict:
        """Steps done, wall seconds (compile included), compile seconds and the mean rates after
        the compile step (NaN until two updates)."""
        if self._first is None:
            nan = math.nan
            return dict(steps=0, wall_s=self.clock() - self._t0, compile_s=nan,
                        steps_per_s=nan, images_per_s=nan)  # fmt: skip
        (t1, s1), (tn, sn) = self._first, self._recent[-1]
        rate = (sn - s1) / (tn - t1) if tn > t1 else math.nan
        return dict(
            steps=sn - self.start, wall_s=tn - self._t0, compile_s=t1 - self._t0,
            steps_per_s=rate, images_per_s=rate * self.batch,
        )  # fmt: skip
