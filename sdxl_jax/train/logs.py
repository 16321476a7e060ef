"""Training logs: TensorBoard event files (through tensorboardX, no TensorFlow), a JSONL metrics
file, the progress line."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from tensorboardX.proto.summary_pb2 import Summary

# tensorboardX is imported where an event file is written (process 0): importing the package
# imports torch when it is installed (seconds, hundreds of MB), which the other processes and
# the rest of this module do not need.

# --- writers ----------------------------------------------------------------------------------


class EventWriter:
    """TensorBoard event file writer (``events.out.tfevents.<time>.<host>.<pid>.sdxl_jax``).

    tensorboardX's synchronous ``EventsWriter`` writes the records (the one its
    ``SummaryWriter`` runs on a background thread): here a flush means the events are on disk.
    Records are flushed after every image or text, every ``flush_every`` scalars, or when
    ``flush_secs`` have passed since the last flush; ``close()`` flushes.
    """

    def __init__(self, logdir: str | Path, *, flush_every: int = 50, flush_secs: float = 10.0):
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        host, pid = socket.gethostname(), os.getpid()
        tail, n = f"{host}.{pid}.sdxl_jax", 0
        while self._taken(tail):  # a second writer of this process here: never share a file
            n += 1
            tail = f"{host}.{pid}.{n}.sdxl_jax"
        self._events = EventsWriter(str(self.logdir / "events"), tail[len(host) :])
        self.path = next(p for p in self.logdir.iterdir() if p.name.endswith(tail))
        self._closed = False
        self._flush_every, self._flush_secs = flush_every, flush_secs
        self.flush()  # the header (file_version brain.Event:2)

    def _taken(self, tail: str) -> bool:
        return any(
            p.name.startswith("events.out.tfevents.") and p.name.endswith(tail)
            for p in self.logdir.iterdir()
        )

    def _write(self, step: int, value: Summary.Value, wall_time: float | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        wall = time.time() if wall_time is None else float(wall_time)
        self._events.write_event(
            Event(wall_time=wall, step=int(step), summary=Summary(value=[value]))
        )
        self._pending += 1
        late = time.monotonic() - self._last_flush >= self._flush_secs
        if (
            value.WhichOneof("value") != "simple_value"
            or late
            or self._pending >= self._flush_every
        ):
            self.flush()

    def scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """A float32 ``simple_value`` (non-finite values are kept: TensorBoard shows them)."""
        from tensorboardX.proto.summary_pb2 import Summary

        self._write(step, Summary.Value(tag=tag, simple_value=float(value)), wall_time)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 image, [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], stored as PNG."""
        from tensorboardX.proto.summary_pb2 import Summary

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
        encoded = Summary.Image(
            height=h, width=w, colorspace=channels, encoded_image_string=png.getvalue()
        )
        self._write(step, Summary.Value(tag=tag, image=encoded))

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text for TensorBoard's text plugin (a scalar string tensor)."""
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboardX.proto.tensor_pb2 import TensorProto
        from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

        metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(
            dtype="DT_STRING", tensor_shape=TensorShapeProto(), string_val=[text.encode()]
        )
        self._write(step, Summary.Value(tag=tag, metadata=metadata, tensor=tensor))

    def flush(self) -> None:
        if not self._closed:
            self._events.flush()
        self._pending, self._last_flush = 0, time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self._events.close()  # flushes
            self._closed = True

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
