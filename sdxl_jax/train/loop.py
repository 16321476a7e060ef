"""The train loop of one stage: set up, restore, step, log, checkpoint, finish.

``run_stage(config, workdir)`` trains ``config.stage`` under ``<workdir>/<stage>/``:

- ``checkpoints/``: orbax, every ``checkpoint.every_steps`` and at the end: the whole state
  (params, optimizer, EMA, step, RNG) with the data iterator's step. A rerun of the same command
  resumes from the latest one exactly (the data order and each step's randomness are functions
  of (seed, step)); a crash or kill during a save leaves the previous one usable.
- ``final_ema/`` and ``export/`` when the stage ends: the EMA weights for the next stage's
  ``init_from``, and a diffusers folder (the whole pipeline for a diffusion stage, ``vae/`` for
  the autoencoder).
- ``metrics.jsonl``, ``tb/`` (TensorBoard), ``config.json``, ``summary.json``.

The workdir may be a bucket (``gs://...``, see :mod:`sdxl_jax.workdir`): checkpoints go there
directly, the rest is written locally and uploaded at each checkpoint and at the end. With
several processes (:mod:`sdxl_jax.distributed`) every one runs this same code: each reads its
slice of every batch and writes its checkpoint shards; process 0 writes the logs, previews and
export.

SIGTERM (preemption) saves at the next step boundary and returns cleanly; rerun to resume.
``max_bad_steps`` non-finite steps in a row stop the run without saving, so the latest
checkpoint is the last good state.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import distributed, sharding
from sdxl_jax import workdir as workdir_lib
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train import config as config_lib
from sdxl_jax.train import logs


class Diverged(RuntimeError):
    """Too many non-finite steps in a row; the latest checkpoint is the last good state."""


@dataclasses.dataclass
class StageResult:
    stage: str
    status: str  # "finished" | "preempted" | "stopped" (stop_at_step) | "already finished"
    step: int
    export: Path | None
    summary: dict[str, Any]


def make_task(config: Any, mesh: jax.sharding.Mesh, workdir: Path) -> Any:
    if config.kind == "autoencoder":
        from sdxl_jax.train.autoencoder import AutoencoderTask

        return AutoencoderTask(config, mesh)
    if config.kind != "diffusion":
        raise ValueError(f"config.kind {config.kind!r}: use 'diffusion' or 'autoencoder'")
    from sdxl_jax.train.diffusion_task import DiffusionTask

    return DiffusionTask(config, mesh, workdir)


def check_data(config: Any) -> None:
    if not config.data.path:
        raise ValueError(
            "data.path is empty: prepare a dataset with `python -m sdxl_jax.data.prepare "
            "--source KIND:LOCATION --out DIR` and pass --config.data.path=DIR"
        )


def resolve_data(config: Any, workdir: Path) -> str:
    """``data.path``: a prepared dataset, or ``synthetic:N``, prepared once into the workdir."""
    path = config.data.path
    check_data(config)
    if not path.startswith("synthetic:"):
        return path
    from sdxl_jax.data.sources import parse_synthetic

    n, seed = parse_synthetic(path)
    out = Path(workdir) / "data" / (f"synthetic_{n}" if seed == 0 else f"synthetic_{n}_seed{seed}")

    def build() -> None:
        from sdxl_jax.data import prepare

        print(f"data: preparing {path} into {out}", flush=True)
        prepare.prepare(path, out, workers=1, progress=False)

    distributed.lead_first(f"data {out}", (out / data_pipeline.INDEX_FILE).exists, build)
    return str(out)


def resolve_cache(config: Any, workdir: Path, data: str) -> str:
    """``data.cache``: a cache folder (``gs://...``: fetched to each host's disk first), empty
    (online encoding), or ``auto``: built once into ``<workdir>/cache/<bucket set>`` with the
    stage's frozen encoders (rebuilt if they change)."""
    cache_dir = config.data.get("cache", "")
    if workdir_lib.is_remote(cache_dir):  # memory-mapped: each host reads its own copy
        return str(workdir_lib.fetch(cache_dir))
    if cache_dir != "auto" or config.kind != "diffusion":
        return "" if cache_dir == "auto" else cache_dir
    from sdxl_jax.data import cache
    from sdxl_jax.train import cache_builder
    from sdxl_jax.train.diffusion_task import frozen_sources

    ckpt, vae = frozen_sources(config, workdir)
    out = Path(workdir) / "cache" / config.data.bucket_set
    meta = out / cache.META
    want = (str(ckpt), str(vae), data)

    def current() -> bool:
        if not meta.exists():
            return False
        m = json.loads(meta.read_text())
        return (m.get("checkpoint"), m.get("vae"), m.get("data")) == want

    def build() -> None:
        if out.exists():  # built from other encoders or data
            import shutil

            shutil.rmtree(out)
        print(f"data: caching latents and text embeddings into {out}", flush=True)
        cache_builder.build_cache(
            data, ckpt, out, bucket_set=config.data.bucket_set, vae=vae, batch_size=64,
            dtype="float32", progress=False,
        )  # fmt: skip

    distributed.lead_first(f"cache {out}", current, build)
    return str(out)


def data_config(config: Any, path: str, cache: str = "") -> data_pipeline.DataConfig:
    fields = {f.name for f in dataclasses.fields(data_pipeline.DataConfig)}
    kw = {k: v for k, v in config.data.items() if k in fields}
    return data_pipeline.DataConfig(**{**kw, "path": path, "seed": config.seed, "cache": cache})


def _host_arrays(task: Any, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if hasattr(task, "host_arrays"):
        return task.host_arrays(batch)
    return {k: batch[k] for k in task.batch_keys}


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _Preemption:
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


def run_stage(
    config: Any,
    workdir: str | Path,
    *,
    stop_at_step: int | None = None,
    quiet: bool = False,
) -> StageResult:
    """Train one stage to ``optim.total_steps`` (x ``optim.accumulate`` batches), resuming.

    ``stop_at_step``: save there and return (status "stopped"), as a preemption would.
    """
    # -- set up: checks, mesh -------------------------------------------------------------
    wd = workdir if isinstance(workdir, workdir_lib.Workdir) else workdir_lib.Workdir(workdir)
    config_lib.validate(config, jax.device_count())
    hosts = jax.process_count()
    if config.data.global_batch_size % hosts:
        raise ValueError(
            f"data.global_batch_size {config.data.global_batch_size} does not divide over "
            f"{hosts} processes: use a multiple of {hosts}"
        )
    check_data(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    ckpts = ckpt_lib.StageCheckpoints(wd.root / config.stage, max_to_keep=config.checkpoint.keep)
    try:
        return _run(config, wd, mesh, ckpts, stop_at_step, quiet)
    except BaseException:
        ckpts.close()  # let saves in flight finish: the latest checkpoint stays usable
        raise


def _stage_names(config: Any) -> list[str]:
    """The names in ``config`` that may be earlier stages of the workdir (init_from, model.vae,
    model.checkpoint): their exports and final EMA weights are fetched to a fresh host."""
    names = [config.get(k, "") for k in ("init_from",)]
    names += [config.model.get(k, "") for k in ("vae", "checkpoint")]
    return [n for n in names if n and "/" not in n and "." not in n]


def _run(
    config: Any,
    wd: workdir_lib.Workdir,
    mesh: jax.sharding.Mesh,
    ckpts: ckpt_lib.StageCheckpoints,
    stop_at_step: int | None,
    quiet: bool,
) -> StageResult:
    workdir = wd.local  # where files are written (the workdir itself unless it is a bucket)
    stage_dir = workdir / config.stage
    lead = jax.process_index() == 0
    say = (lambda *a: None) if quiet or not lead else (lambda *a: print(*a, flush=True))
    total = int(config.optim.total_steps) * int(config.optim.accumulate)
    latest = ckpts.latest_step()
    if latest is not None and latest >= total and (ckpts.directory / ckpt_lib.FINAL_EMA).exists():
        ckpts.close()
        say(f"[{config.stage}] already finished ({latest} steps): {wd.root / config.stage}")
        wd.download(f"{config.stage}/summary.json")
        done = stage_dir / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else {}
        return StageResult(config.stage, "already finished", latest, stage_dir / "export", summary)
    # A fresh host of a bucket workdir: this stage's logs (to continue them), the earlier
    # stages it starts from.
    wd.download(config.stage, skip=(workdir_lib.CHECKPOINTS, ckpt_lib.FINAL_EMA))
    for name in _stage_names(config):
        wd.download(f"{name}/export")
        wd.download(f"{name}/{ckpt_lib.FINAL_EMA}")
    if lead:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # -- data -------------------------------------------------------------------------------
    data = resolve_data(config, workdir)
    dcfg = data_config(config, data, resolve_cache(config, workdir, data))

    # -- model ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    task = make_task(config, mesh, workdir)

    # -- restore or start -------------------------------------------------------------------
    if latest is not None:
        state, data_state, _ = ckpts.restore(task.abstract_state(), latest)
        start = int(state.step)
        say(f"[{config.stage}] resumed from step {start} ({ckpts.directory / 'checkpoints'})")
    else:
        state, data_state, start = task.init_state(), None, 0
        if config.init_from:
            say(f"[{config.stage}] initialised from {config.init_from}")
    it = data_pipeline.make_iterator(dcfg, start_step=start, verbose=not quiet)
    if data_state is not None:
        it.set_state(data_state)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.ema))
    mesh_text = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    say(
        f"[{config.stage}] {n_params / 1e6:.2f}M trained parameters | mesh {mesh_text} | "
        f"setup {time.perf_counter() - t0:.1f} s"
    )

    writer = jsonl = trace = None
    trace_rel = f"{config.stage}/data_trace/process_{jax.process_index()}.jsonl"
    if config.log.get("trace_data", False):  # every process: its own rows of each batch
        (stage_dir / "data_trace").mkdir(parents=True, exist_ok=True)
        trace = open(workdir / trace_rel, "a")
    if lead:
        writer = logs.EventWriter(stage_dir / "tb")
        jsonl = logs.JsonlWriter(stage_dir / "metrics.jsonl")
    progress = logs.Progress(
        total, start, dcfg.global_batch_size, stage=config.stage,
        stream=sys.stdout if lead and not quiet else _Null(),
    )  # fmt: skip

    def mirror() -> None:
        """A bucket workdir: upload the logs written so far (at checkpoints and the end)."""
        if not wd.remote:
            return
        if writer is not None:
            writer.flush()
        if trace is not None and not trace.closed:
            trace.flush()
        if lead:
            wd.upload(config.stage)
        elif trace is not None:
            wd.upload(trace_rel)

    meta = {"stage": config.stage, "config": json.loads(config.to_json_best_effort())}
    log_every = max(1, int(config.log.every_steps))
    ckpt_every = int(config.checkpoint.every_steps)
    preview_every = int(config.log.sample_every_steps)
    streak = int(state.bad_streak)
    sums: dict[str, float] = {}
    count = 0
    status = "finished"
    pending: tuple[int, dict, tuple[int, int]] | None = None
    save_due = False
    multi, compiled = jax.process_count() > 1, set()
    saved = latest  # the step of the newest checkpoint (orbax refuses to save a step twice)

    def absorb(step: int, metrics: dict, bucket: tuple[int, int]) -> None:
        """Bookkeeping of a finished step (read one step late, so the device stays busy)."""
        nonlocal streak, count
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        streak = streak + 1 if m.get("skipped", 0.0) else 0
        if streak >= config.max_bad_steps:
            raise Diverged(
                f"[{config.stage}] {streak} non-finite steps in a row (last: step {step}); "
                f"stopped without saving: the latest checkpoint "
                f"(step {ckpts.latest_step()}) is the last good state. Lower optim.lr, check "
                f"the data, or raise max_bad_steps"
            )
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == total:
            mean = {k: v / count for k, v in sums.items()}
            mean["skipped"] = sums.get("skipped", 0.0)
            line_scalars = {k: mean[k] for k in ("loss", "lr", "grad_norm") if k in mean}
            progress.update(step + 1, line_scalars, bucket)
            perf = progress.summary()
            rates = {f"perf/{k}": perf[k] for k in ("steps_per_s", "images_per_s") if k in perf}
            scalars = {**{f"train/{k}": v for k, v in mean.items()}, **rates}
            if writer is not None:
                for k, v in scalars.items():
                    writer.scalar(k, v, step + 1)
                writer.flush()
                jsonl.write(step + 1, scalars)
            sums.clear()
            count = 0

    # -- loop -------------------------------------------------------------------------------
    with _Preemption() as preemption:
        step = start
        try:
            while step < total:
                host = next(it)
                bucket = _bucket(host)
                if trace is not None and "index" in host:
                    rows = np.asarray(host["index"]).tolist()
                    trace.write(json.dumps({"step": step, "bucket": bucket, "index": rows}) + "\n")
                batch = data_pipeline.to_global(_host_arrays(task, host), mesh, sharding.BATCH_AXES)
                shapes = multi and tuple((k, v.shape) for k, v in sorted(batch.items()))
                if shapes and shapes not in compiled:
                    # Processes compile at different speeds; the first run of a program with
                    # collectives must not start on one while another still compiles (gloo
                    # waits only 30 s for its peers): compile, wait for all, then run.
                    task.compile_step(state, batch)
                    distributed.barrier(f"{config.stage} step {bucket}")
                    compiled.add(shapes)
                state, metrics = task.step(state, batch)
                if pending is not None:
                    absorb(*pending)
                pending = (step, metrics, bucket)
                step += 1
                if ckpt_every and step < total and (step % ckpt_every == 0 or save_due):
                    absorb(*pending)  # know this step's outcome before saving it
                    pending = None
                    # Never checkpoint inside a run of non-finite steps: the latest checkpoint
                    # stays the last good state; the save waits for a good step.
                    save_due = streak > 0
                    if not save_due:
                        ckpts.save(step, state, it.get_state(), meta)
                        saved = step
                        mirror()
                if preview_every and step % preview_every == 0:
                    image = task.preview(state)  # every process: sampling is one SPMD program
                    if image is not None and writer is not None:
                        writer.image("samples", image, step)
                stop = stop_at_step is not None and step >= stop_at_step
                if preemption.requested or ckpts.reached_preemption(step) or stop:
                    if pending is not None:
                        absorb(*pending)
                    pending = None
                    if saved != step:
                        ckpts.save(step, state, it.get_state(), meta, force=True)
                    ckpts.wait()
                    mirror()
                    status = "stopped" if stop and not preemption.requested else "preempted"
                    say(f"[{config.stage}] {status} at step {step}; saved; rerun to resume")
                    break
            if pending is not None:
                absorb(*pending)
        finally:
            it.close()
            if trace is not None:
                trace.close()
            if writer is not None:
                writer.flush()

    # -- finish -----------------------------------------------------------------------------
    export = None
    summary = {"stage": config.stage, "status": status, "step": step, **progress.summary()}
    if status == "finished":
        if saved != step:
            ckpts.save(step, state, it.get_state(), meta, force=True)
        ckpts.wait()
        ckpts.save_final_ema(state.ema)
        # Every process: gathering the sharded weights is collective; process 0 writes.
        export = task.export(state, stage_dir / "export")
        image = task.preview(state) if preview_every else None
        if image is not None and writer is not None:
            writer.image("samples", image, step)
        summary["skipped_steps"] = int(state.skipped)
        summary["export"] = str(export) if export else None
        if lead:
            (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        mirror()
        say(
            f"[{config.stage}] done: {step} steps in {summary.get('wall_s', 0):.0f} s, "
            f"{int(state.skipped)} skipped; export {export}"
        )
    ckpts.close()
    if writer is not None:
        writer.close()
        jsonl.close()
    return StageResult(config.stage, status, step, export, summary)


def _bucket(host: Mapping[str, Any]) -> tuple[int, int]:
    """The batch's (h, w) in pixels: every row has the same target size."""
    return (
        tuple(int(x) for x in np.asarray(host["target_size"])[0])
        if "target_size" in host
        else (0, 0)
    )


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass
