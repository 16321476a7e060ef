"""The train loop's policies (:mod:`sdxl_jax.train.loop`): small objects it consults at each
step boundary. How batches reach the devices (:class:`Feed`), what is logged
(:class:`OneStepLate`, :class:`MetricsLog`), when a run of non-finite steps stops it
(:class:`NonFiniteStreak`), when it checkpoints (:class:`Checkpointing`), previews
(:class:`Previews`) or stops early (:class:`Stopping`), and how a bucket workdir gets the logs
(:class:`Mirror`).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import distributed, sharding
from sdxl_jax import workdir as workdir_lib
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train import logs


class Diverged(RuntimeError):
    """Too many non-finite steps in a row; the latest checkpoint is the last good state."""


# -- batches ---------------------------------------------------------------------------------


class DataTrace:
    """``log.trace_data``: every process appends each step's bucket and record indices (its
    own rows of the batch) to ``<stage>/data_trace/process_<i>.jsonl``."""

    def __init__(self, workdir: Path, stage: str):
        self.rel = f"{stage}/data_trace/process_{jax.process_index()}.jsonl"
        (workdir / stage / "data_trace").mkdir(parents=True, exist_ok=True)
        self._file = open(workdir / self.rel, "a")

    @classmethod
    def open(cls, config: Any, workdir: Path) -> DataTrace | None:
        return cls(workdir, config.stage) if config.log.get("trace_data", False) else None

    def write(self, step: int, bucket: tuple[int, int], host: Mapping[str, Any]) -> None:
        if "index" in host:
            rows = np.asarray(host["index"]).tolist()
            self._file.write(json.dumps({"step": step, "bucket": bucket, "index": rows}) + "\n")

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class Feed:
    """The data iterator's host batches as global arrays on the mesh (the keys the task reads).

    With several processes, the first batch of each shape is compiled on every process before
    any runs it: processes compile at different speeds, and gloo waits only 30 s for its peers
    in a program's first collective.
    """

    def __init__(self, it: Any, task: Any, mesh: Any, stage: str, trace: DataTrace | None):
        self.it, self.task, self.mesh, self.stage, self.trace = it, task, mesh, stage, trace
        self._multi, self._compiled = jax.process_count() > 1, set()

    def next(self, step: int, state: Any) -> tuple[dict[str, jax.Array], tuple[int, int]]:
        """Step ``step``'s global batch and its bucket (h, w) in pixels."""
        host = next(self.it)
        bucket = batch_bucket(host)
        if self.trace is not None:
            self.trace.write(step, bucket, host)
        arrays = _host_arrays(self.task, host)
        batch = data_pipeline.to_global(arrays, self.mesh, sharding.BATCH_AXES)
        shapes = self._multi and tuple((k, v.shape) for k, v in sorted(batch.items()))
        if shapes and shapes not in self._compiled:
            self.task.compile_step(state, batch)
            distributed.barrier(f"{self.stage} step {bucket}")
            self._compiled.add(shapes)
        return batch, bucket

    def close(self) -> None:
        self.it.close()
        if self.trace is not None:
            self.trace.close()


def batch_bucket(host: Mapping[str, Any]) -> tuple[int, int]:
    """The batch's (h, w) in pixels: every row has the same target size."""
    return (
        tuple(int(x) for x in np.asarray(host["target_size"])[0])
        if "target_size" in host
        else (0, 0)
    )


def _host_arrays(task: Any, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if hasattr(task, "host_arrays"):
        return task.host_arrays(batch)
    return {k: batch[k] for k in task.batch_keys}


# -- metrics ---------------------------------------------------------------------------------


class OneStepLate:
    """Holds a step's metrics (device arrays) until the next step is dispatched, then hands
    their host values to ``readers`` in order: reading waits for the device, which a step
    behind never idles. ``drain`` reads the held step now."""

    def __init__(self, *readers: Callable[[int, dict[str, float], tuple[int, int]], None]):
        self._readers = readers
        self._held: tuple[int, dict, tuple[int, int]] | None = None

    def push(self, step: int, metrics: dict[str, jax.Array], bucket: tuple[int, int]) -> None:
        self.drain()
        self._held = (step, metrics, bucket)

    def drain(self) -> None:
        if self._held is None:
            return
        step, metrics, bucket = self._held
        self._held = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for read in self._readers:
            read(step, m, bucket)


class NonFiniteStreak:
    """Counts the steps in a row whose update was skipped (non-finite loss or gradients);
    ``limit`` of them raise :class:`Diverged`, without saving: the latest checkpoint is the
    last good state."""

    def __init__(self, config: Any, streak: int, latest: Callable[[], int | None]):
        self.streak, self.limit, self.stage = streak, config.max_bad_steps, config.stage
        self._latest = latest

    @property
    def in_run(self) -> bool:
        return self.streak > 0

    def check(self, step: int, m: dict[str, float], bucket: tuple[int, int]) -> None:
        self.streak = self.streak + 1 if m.get("skipped", 0.0) else 0
        if self.streak >= self.limit:
            done = step + 1  # steps are counted from 1, as in metrics.jsonl
            latest = self._latest()
            kept = (
                f"the latest checkpoint (step {latest}) is the last good state and a rerun "
                f"resumes there"
                if latest is not None
                else "no checkpoint was saved before them, so a rerun starts over"
            )
            raise Diverged(
                f"[{self.stage}] {self.streak} non-finite steps in a row (steps "
                f"{done - self.streak + 1}-{done}); stopped without saving them: {kept}. "
                f"Lower optim.lr, check the data, or raise max_bad_steps"
            )


class MetricsLog:
    """Step metrics averaged over ``log.every_steps`` steps (``skipped`` summed) into the
    progress line (process 0, unless quiet), ``tb/`` and ``metrics.jsonl`` (process 0), with
    the throughput (``perf/``)."""

    def __init__(
        self,
        config: Any,
        stage_dir: Path,
        total: int,
        start: int,
        global_batch: int,
        *,
        lead: bool,
        quiet: bool,
    ):
        self.total, self.every = total, max(1, int(config.log.every_steps))
        self.writer = logs.EventWriter(stage_dir / "tb") if lead else None
        self.jsonl = logs.JsonlWriter(stage_dir / "metrics.jsonl") if lead else None
        self.progress = logs.Progress(  # last: its clock starts at the first step
            total, start, global_batch, stage=config.stage,
            stream=sys.stdout if lead and not quiet else None,
        )  # fmt: skip
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, step: int, m: dict[str, float], bucket: tuple[int, int]) -> None:
        for k, v in m.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        done = step + 1
        if done % self.every and done != self.total:
            return
        mean = {k: v / self._count for k, v in self._sums.items()}
        mean["skipped"] = self._sums.get("skipped", 0.0)
        self.progress.update(
            done, {k: mean[k] for k in ("loss", "lr", "grad_norm") if k in mean}, bucket
        )
        perf = self.progress.summary()
        rates = {f"perf/{k}": perf[k] for k in ("steps_per_s", "images_per_s") if k in perf}
        scalars = {**{f"train/{k}": v for k, v in mean.items()}, **rates}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.scalar(k, v, done)
            self.writer.flush()
            self.jsonl.write(done, scalars)
        self._sums.clear()
        self._count = 0

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars outside the training average (evaluations), to TensorBoard and JSONL."""
        if self.writer is not None:
            for k, v in values.items():
                self.writer.scalar(k, v, step)
            self.writer.flush()
            self.jsonl.write(step, values)

    def image(self, tag: str, image: np.ndarray | None, step: int) -> None:
        if image is not None and self.writer is not None:
            self.writer.image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


# -- checkpoints, previews, stopping, mirroring ----------------------------------------------


class Checkpointing:
    """The state with the data iterator's position, saved every ``checkpoint.every_steps``
    steps before the last and when the run ends or stops.

    Never inside a run of non-finite steps: the latest checkpoint stays the last good state, and
    the periodic save waits for the next good step. Never the same step twice (orbax refuses):
    the final save is skipped when a periodic one just saved that step.
    """

    def __init__(
        self,
        ckpts: ckpt_lib.StageCheckpoints,
        it: Any,
        config: Any,
        total: int,
        saved: int | None,
        after_save: Callable[[], None],
    ):
        self.ckpts, self.it, self.total, self.saved = ckpts, it, total, saved
        self.every = int(config.checkpoint.every_steps)
        self.meta = {"stage": config.stage, "config": json.loads(config.to_json_best_effort())}
        self._after_save = after_save
        self._waiting = False  # a periodic save put off by a run of non-finite steps

    def due(self, step: int) -> bool:
        """Whether a periodic save is due after ``step`` steps (its outcome must be known)."""
        return bool(self.every) and step < self.total and (step % self.every == 0 or self._waiting)

    def periodic(self, step: int, state: Any, in_bad_run: bool) -> None:
        self._waiting = in_bad_run
        if not in_bad_run:
            self.ckpts.save(step, state, self.it.get_state(), self.meta)
            self.saved = step
            self._after_save()

    def final(self, step: int, state: Any) -> None:
        """Save ``step`` (unless saved already) and wait until every save is complete."""
        if self.saved != step:
            self.ckpts.save(step, state, self.it.get_state(), self.meta, force=True)
        self.ckpts.wait()


class Previews:
    """``task.preview`` (a sample grid) every ``log.sample_every_steps`` steps and at the end,
    into TensorBoard. Every process runs it (sampling is one SPMD program); process 0 writes."""

    def __init__(self, task: Any, config: Any, log: MetricsLog):
        self.task, self.every, self.log = task, int(config.log.sample_every_steps), log

    def maybe(self, step: int, state: Any) -> None:
        if self.every and step % self.every == 0:
            self.log.image("samples", self.task.preview(state), step)

    def final(self, step: int, state: Any) -> None:
        if self.every:
            self.log.image("samples", self.task.preview(state), step)


class Stopping:
    """Why a run stops before its last step, asked at each step boundary: SIGTERM (a preemption
    notice; the handler only sets a flag), orbax's preemption sync point (every process of a
    multi-host run stops at the same step), ``stop_at_step``. Use it as a context manager: the
    SIGTERM handler is installed inside."""

    def __init__(self, ckpts: ckpt_lib.StageCheckpoints, stop_at_step: int | None):
        self.ckpts, self.stop_at_step = ckpts, stop_at_step
        self.requested = False
        self._old = None

    def __enter__(self) -> Stopping:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        print("\nSIGTERM: saving at the end of this step, then exiting", file=sys.stderr)
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def reason(self, step: int) -> str | None:
        """ "preempted", "stopped" (``stop_at_step``) or None (go on) after ``step`` steps."""
        stop = self.stop_at_step is not None and step >= self.stop_at_step
        if self.requested or self.ckpts.reached_preemption(step) or stop:
            return "stopped" if stop and not self.requested else "preempted"
        return None


class Mirror:
    """A bucket workdir (``gs://...``): upload the logs written so far, at checkpoints and at
    the end. Process 0 uploads the stage folder, the others their data trace."""

    def __init__(
        self,
        wd: workdir_lib.Workdir,
        stage: str,
        log: MetricsLog,
        trace: DataTrace | None,
        lead: bool,
    ):
        self.wd, self.stage, self.log, self.trace, self.lead = wd, stage, log, trace, lead

    def __call__(self) -> None:
        if not self.wd.remote:
            return
        self.log.flush()
        if self.trace is not None:
            self.trace.flush()
        if self.lead:
            self.wd.upload(self.stage)
        elif self.trace is not None:
            self.wd.upload(self.trace.rel)
