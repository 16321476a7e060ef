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

One run per stage: ``<stage>/lock.json`` (:mod:`sdxl_jax.train.lock`) refuses a second trainer at
once, naming the first; a crashed run's lock does not block its rerun. A damaged newest
checkpoint (unreadable, or differing from the digest saved with it) is moved to
``<stage>/damaged/`` with a warning and the run resumes from the one before
(:mod:`sdxl_jax.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sdxl_jax import checkpoint as ckpt_lib
from sdxl_jax import distributed, sharding
from sdxl_jax import workdir as workdir_lib
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train import config as config_lib
from sdxl_jax.train import evaluation, policies
from sdxl_jax.train import lock as lock_lib
from sdxl_jax.train.policies import Diverged as Diverged  # callers catch loop.Diverged


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
    if not config.data.path and config.get("dreambooth") is None:
        raise ValueError(
            "data.path is empty: prepare a dataset with `python -m sdxl_jax.data.prepare "
            "--source KIND:LOCATION --out DIR` and pass --config.data.path=DIR"
        )


def check_dataset(path: str) -> None:
    """A prepared dataset at ``path`` with records in it, before anything heavy loads."""
    from sdxl_jax.data import batching

    try:
        index = batching.load_index(path)
    except FileNotFoundError as e:
        raise ValueError(f"data.path {path}: {e}") from None
    if not len(next(iter(index.values()), ())):
        raise ValueError(
            f"data.path {path}: the dataset holds no records; prepare it from a source with "
            f"images: python -m sdxl_jax.data.prepare --source KIND:LOCATION --out DIR"
        )


def resolve_data(config: Any, workdir: Path, say: Callable[..., None] = print) -> str:
    """``data.path``: a prepared dataset, or ``synthetic:N``, prepared once into the workdir; a
    DreamBooth stage's dataset (class images generated first: ``sdxl_jax.train.dreambooth``)."""
    path = config.data.path
    check_data(config)
    if config.get("dreambooth") is not None:
        from sdxl_jax.train import dreambooth
        from sdxl_jax.train.diffusion_task import resolve, stage_export

        init = stage_export(config.init_from, workdir) or resolve(config.init_from, workdir)
        return dreambooth.prepare_data(config, workdir, init, say)
    if not path.startswith("synthetic:"):
        return path
    from sdxl_jax.data.readers import SYNTHETIC_SHAPE_OPTIONS
    from sdxl_jax.data.sources import parse_spec, parse_synthetic

    n, seed = parse_synthetic(path)
    name = f"synthetic_{n}" if seed == 0 else f"synthetic_{n}_seed{seed}"
    options = parse_spec(path)[2]
    for key in ("colour", "word"):  # a concept's images (DreamBooth, LoRA)
        name += f"_{options[key].replace(',', '_')}" if options.get(key) else ""
    for key in SYNTHETIC_SHAPE_OPTIONS:  # sizes and placement (experiments/microconditioning)
        name += f"_{key}{options[key]}" if options.get(key) else ""
    out = Path(workdir) / "data" / name

    def build() -> None:
        from sdxl_jax.data import prepare

        print(f"data: preparing {path} into {out}", flush=True)
        prepare.prepare(path, out, workers=1, progress=False)

    distributed.lead_first(f"data {out}", (out / data_pipeline.INDEX_FILE).exists, build)
    return str(out)


def resolve_cache(config: Any, workdir: Path, data: str) -> str:
    """``data.cache``: a cache folder (``gs://...``: fetched to each host's disk first), empty
    (online encoding), or ``auto``: built once into ``<workdir>/cache/<bucket set>`` with the
    stage's frozen encoders (rebuilt if they change); with ``data.cache_crops`` = K > 0, K random
    crops per record (``<bucket set>_random<K>``; the crops drawn from ``seed``)."""
    cache_dir = config.data.get("cache", "")
    if workdir_lib.is_remote(cache_dir):  # memory-mapped: each host reads its own copy
        return str(workdir_lib.fetch(cache_dir))
    if cache_dir != "auto" or config.kind != "diffusion":
        return "" if cache_dir == "auto" else cache_dir
    from sdxl_jax.data import cache
    from sdxl_jax.train import cache_builder
    from sdxl_jax.train.diffusion_task import frozen_sources

    ckpt, vae = frozen_sources(config, workdir)
    crops = int(config.data.get("cache_crops", 0))
    name = config.data.bucket_set + (f"_random{crops}" if crops else "")
    out = Path(workdir) / "cache" / name
    meta = out / cache.META
    want = (str(ckpt), str(vae), data, crops and config.seed)

    def current() -> bool:
        if not meta.exists():
            return False
        m = json.loads(meta.read_text())
        got = (m.get("checkpoint"), m.get("vae"), m.get("data"), crops and m.get("crop_seed"))
        return got == want

    def build() -> None:
        if out.exists():  # built from other encoders or data
            import shutil

            shutil.rmtree(out)
        print(f"data: caching latents and text embeddings into {out}", flush=True)
        cache_builder.build_cache(
            data, ckpt, out, bucket_set=config.data.bucket_set, vae=vae, batch_size=64,
            dtype="float32", progress=False, random_crops=crops, seed=config.seed,
        )  # fmt: skip

    distributed.lead_first(f"cache {out}", current, build)
    return str(out)


def data_config(config: Any, path: str, cache: str = "") -> data_pipeline.DataConfig:
    fields = {f.name for f in dataclasses.fields(data_pipeline.DataConfig)}
    kw = {k: v for k, v in config.data.items() if k in fields}
    return data_pipeline.DataConfig(**{**kw, "path": path, "seed": config.seed, "cache": cache})


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
    evaluation.check(config)  # config.eval: weights files, prompt set, reference
    # One run per stage: process 0 takes the lock before anything is written (a read-only
    # workdir fails here too); the others wait for it.
    lock = lock_lib.StageLock(wd.root, config.stage, warn=ckpt_lib.warn)
    if jax.process_index() == 0:
        lock.acquire()
    try:
        distributed.barrier(f"{config.stage} lock")
        mesh = sharding.make_mesh(dict(config.mesh))
        ckpts = ckpt_lib.StageCheckpoints(
            wd.root / config.stage, max_to_keep=config.checkpoint.keep
        )
        try:
            return _run(config, wd, mesh, ckpts, stop_at_step, quiet)
        except BaseException:
            ckpts.close()  # let saves in flight finish: the latest checkpoint stays usable
            raise
    finally:
        lock.release()


def export_checkpoint(
    config: Any, workdir: str | Path, step: int | None = None, out: str | Path | None = None
) -> Path:
    """Export the EMA weights of checkpoint ``step`` (default: the newest) of a stage, on demand,
    as its end does: a diffusers folder, or for LoRA stages the kohya and diffusers/PEFT files.
    ``out`` (default ``<workdir>/<stage>/export_step<N>``) must not exist; the checkpoint is
    checked against its digest. Local workdirs."""
    stage_dir = Path(workdir) / config.stage
    ckpts = ckpt_lib.StageCheckpoints(stage_dir, async_save=False)
    try:
        steps = sorted(ckpts.manager.all_steps())
        if not steps:
            raise ValueError(f"{stage_dir}: no checkpoints to export (train the stage first)")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"{stage_dir}: no checkpoint at step {step}; there are {steps}")
        out = Path(out) if out else stage_dir / f"export_step{step}"
        if out.exists():
            raise ValueError(f"{out} exists: give a new path (nothing is overwritten)")
        config_lib.validate(config, jax.device_count())
        task = make_task(config, sharding.make_mesh(dict(config.mesh)), Path(workdir))
        ema, _ = ckpts.restore_ema(task.abstract_state().ema, step)
        return task.export(_EMAOnly(ema), out)
    finally:
        ckpts.close()


@dataclasses.dataclass(frozen=True)
class _EMAOnly:
    """What a task's export reads of a train state."""

    ema: Any


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
        return _already_finished(config, wd, ckpts, latest, say)
    _prepare_stage_dir(config, wd)

    # -- data -------------------------------------------------------------------------------
    data = resolve_data(config, workdir, say)
    check_dataset(data)
    dcfg = data_config(config, data, resolve_cache(config, workdir, data))

    # -- model ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    task = make_task(config, mesh, workdir)

    # -- restore or start -------------------------------------------------------------------
    state, data_state, start = _restore_or_init(config, task, ckpts, say)
    it = data_pipeline.make_iterator(dcfg, start_step=start, verbose=not quiet)
    if data_state is not None:
        it.set_state(data_state)
    say(_setup_line(config, state, mesh, time.perf_counter() - t0))

    # -- policies ---------------------------------------------------------------------------
    trace = policies.DataTrace.open(config, workdir)
    feed = policies.Feed(it, task, mesh, config.stage, trace)
    log = policies.MetricsLog(
        config, stage_dir, total, start, dcfg.global_batch_size, lead=lead, quiet=quiet
    )
    mirror = policies.Mirror(wd, config.stage, log, trace, lead)
    saver = policies.Checkpointing(ckpts, it, config, total, ckpts.latest_step(), mirror)
    samplers = (policies.Previews(task, config, log), evaluation.Evaluations(task, config, log))
    bad = policies.NonFiniteStreak(config, int(state.bad_streak), ckpts.latest_step)
    late = policies.OneStepLate(log.add, bad.check)  # the step that stops a run is logged too

    # -- loop -------------------------------------------------------------------------------
    status, done = "finished", start
    with policies.Stopping(ckpts, stop_at_step) as stopping:
        try:
            for step in range(start, total):
                batch, bucket = feed.next(step, state)
                state, metrics = task.step(state, batch)
                late.push(step, metrics, bucket)  # reads the previous step's metrics
                done = step + 1
                if saver.due(done):
                    late.drain()  # know this step's outcome before saving it
                    saver.periodic(done, state, in_bad_run=bad.in_run)
                for sampler in samplers:  # previews, evaluations
                    sampler.maybe(done, state)
                if reason := stopping.reason(done):
                    late.drain()
                    saver.final(done, state)
                    mirror()
                    status = reason
                    say(f"[{config.stage}] {status} at step {done}; saved; rerun to resume")
                    break
            late.drain()
        finally:
            feed.close()
            log.flush()

    # -- finish -----------------------------------------------------------------------------
    summary = {"stage": config.stage, "status": status, "step": done, **log.progress.summary()}
    export = None
    if status == "finished":
        export = _finish(task, state, done, saver, samplers, mirror, summary, stage_dir, say)
    ckpts.close()
    log.close()
    return StageResult(config.stage, status, done, export, summary)


def _already_finished(
    config: Any,
    wd: workdir_lib.Workdir,
    ckpts: ckpt_lib.StageCheckpoints,
    latest: int,
    say: Callable[..., None],
) -> StageResult:
    ckpts.close()
    say(f"[{config.stage}] already finished ({latest} steps): {wd.root / config.stage}")
    wd.download(f"{config.stage}/summary.json")
    stage_dir = wd.local / config.stage
    done = stage_dir / "summary.json"
    summary = json.loads(done.read_text()) if done.exists() else {}
    return StageResult(config.stage, "already finished", latest, stage_dir / "export", summary)


def _prepare_stage_dir(config: Any, wd: workdir_lib.Workdir) -> None:
    """A fresh host of a bucket workdir gets this stage's logs (to continue them) and the
    earlier stages it starts from; process 0 writes the resolved config."""
    written_in_place = (workdir_lib.CHECKPOINTS, ckpt_lib.FINAL_EMA, ckpt_lib.DAMAGED)
    wd.download(config.stage, skip=written_in_place)
    for name in _stage_names(config):
        wd.download(f"{name}/export")
        wd.download(f"{name}/{ckpt_lib.FINAL_EMA}")
    if jax.process_index() == 0:
        stage_dir = wd.local / config.stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "config.json").write_text(config.to_json_best_effort(indent=2))


def _restore_or_init(
    config: Any,
    task: Any,
    ckpts: ckpt_lib.StageCheckpoints,
    say: Callable[..., None],
) -> tuple[Any, dict | None, int]:
    """(state, data iterator state or None, first step): the newest checkpoint that restores
    intact (damaged newer ones are moved aside, with a warning), else fresh."""
    found = ckpts.restore_newest(task.abstract_state(), warn=ckpt_lib.warn)
    if found is not None:
        state, data_state, _, _ = found
        start = int(state.step)
        say(f"[{config.stage}] resumed from step {start} ({ckpts.directory / 'checkpoints'})")
        return state, data_state, start
    state = task.init_state()
    if config.init_from:
        say(f"[{config.stage}] initialised from {config.init_from}")
    return state, None, 0


def _setup_line(config: Any, state: Any, mesh: jax.sharding.Mesh, seconds: float) -> str:
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.ema))
    mesh_text = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return (
        f"[{config.stage}] {n_params / 1e6:.2f}M trained parameters | mesh {mesh_text} | "
        f"setup {seconds:.1f} s"
    )


def _finish(
    task: Any,
    state: Any,
    step: int,
    saver: policies.Checkpointing,
    samplers: tuple[policies.Previews, evaluation.Evaluations],
    mirror: policies.Mirror,
    summary: dict[str, Any],
    stage_dir: Path,
    say: Callable[..., None],
) -> Path:
    """The end of a stage: the last checkpoint, the final EMA, the export, a last preview and
    evaluation, ``summary.json`` (completed in ``summary``), the last upload. Returns the
    export."""
    saver.final(step, state)
    saver.ckpts.save_final_ema(state.ema, step)
    # Every process: gathering the sharded weights is collective; process 0 writes.
    export = task.export(state, stage_dir / "export")
    previews, evals = samplers
    previews.final(step, state)
    evals.final(step, state)
    if evals.last is not None:
        summary["eval"] = evals.last
    summary["skipped_steps"] = int(state.skipped)
    summary["export"] = str(export) if export else None
    if jax.process_index() == 0:
        (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    mirror()
    say(
        f"[{summary['stage']}] done: {step} steps in {summary.get('wall_s', 0):.0f} s, "
        f"{int(state.skipped)} skipped; export {export}"
    )
    return export
