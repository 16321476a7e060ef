"""``python -m sdxl_jax.train``: train one stage, or (no arguments) the tiny curriculum.

  python -m sdxl_jax.train --config experiments/base_256.py --workdir gs://BUCKET/run
  python -m sdxl_jax.train --config experiments/base_256.py:tiny --workdir /tmp/run \\
      --config.optim.lr=3e-4 --config.data.global_batch_size=64
  python -m sdxl_jax.train            # the whole tiny curriculum on CPU, then its scores

The config is locked: a misspelt ``--config.key``, a value of the wrong type or an unknown variant
(``:tny``) fails in one line before anything runs (exit status 2, as a config the checks refuse,
a workdir that cannot be written or one whose stage another run holds). Rerunning a command
resumes from its stage's latest checkpoint. See ``--helpfull`` for every flag. A path
``experiments/<stage>.py`` is found in the installed package when the current directory has none.

The terminal shows the progress and warnings; ``-v 0`` (absl's ``--verbosity``) or
``SDXL_VERBOSE=1`` adds the libraries' INFO logs (orbax's checkpointing, jax's backends).

Many hosts run the same command as one JAX program (``sdxl_jax/distributed.py``): a Cloud TPU
pod and SLURM ``srun`` are detected; anywhere else pass ``--coordinator HOST:PORT
--num_processes N --process_id I`` (or SDXL_COORDINATOR / SDXL_NUM_PROCESSES / SDXL_PROCESS_ID).
``launch/tpu_pod.sh``, ``launch/gpu_slurm.sh`` and ``launch/local.sh`` do this for you.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "A stage config: experiments/<stage>.py[:variant], e.g. experiments/base_256.py:tiny. "
    "Override fields with --config.key=value. Omitted: the tiny curriculum on CPU.",
    lock_config=True,
)


class _StageConfigParser(ConfigFileFlagParser):
    """``--config path.py[:arg]`` with the path found by ``sdxl_jax.train.config.config_file``
    (the installed ``experiments`` package when the current directory has no such file)."""

    last: Any = None  # the config parsed, for naming a misspelt override

    def parse(self, path: str) -> Any:
        from sdxl_jax.train import config as config_lib

        file, sep, arg = path.partition(":")
        found = config_lib.config_file(file)
        if not found.is_file():
            raise ValueError(f"{file}: no such file; use experiments/<stage>.py[:variant]")
        try:
            config = super().parse(str(found) + sep + arg)
        except Exception as e:  # get_config's own error, inside a formatted traceback
            lines = [x for x in str(e).splitlines() if x.strip()]
            raise ValueError(lines[-1].split("Error: ", 1)[-1] if lines else str(e)) from None
        _StageConfigParser.last = config
        return config


flags.FLAGS["config"].parser = _StageConfigParser(name="config", lock_config=True)

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run folder (local or gs://); each stage writes <workdir>/<stage>/. Default with no "
    "--config: runs/tiny_curriculum.",
)
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "Save a checkpoint at this step and exit (as a preemption would)."
)
_EXPORT_STEP = flags.DEFINE_integer(
    "export_step",
    None,
    "Export checkpoint N of the stage (-1: the newest) as its end does (a diffusers folder; "
    "LoRA stages: kohya + diffusers/PEFT files) to --export_to, and exit; no training.",
)
_EXPORT_TO = flags.DEFINE_string(
    "export_to", None, "With --export_step: a new folder (default <workdir>/<stage>/export_stepN)."
)


_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/sdxl_jax/xla")),
    "Persistent XLA compilation cache: a rerun or resume skips compiling ('' to disable).",
)


_COORDINATOR = flags.DEFINE_string(
    "coordinator",
    None,
    "Multi-process: HOST:PORT of process 0's coordinator (or SDXL_COORDINATOR). Not needed on "
    "a Cloud TPU pod or under SLURM srun (detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process: how many processes (or SDXL_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process: this process's id, 0..N-1 (or SDXL_PROCESS_ID)."
)
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids",
    None,
    "Devices (GPUs) of this process, e.g. 0,1 (or SDXL_LOCAL_DEVICE_IDS). Default: all visible; "
    "under SLURM one task per GPU takes its own.",
)


def quiet_logs() -> None:
    """Warnings and errors only from absl (orbax logs through it), orbax and jax, unless
    ``--verbosity`` / ``-v`` was given or ``SDXL_VERBOSE=1``."""
    if flags.FLAGS["verbosity"].present or os.environ.get("SDXL_VERBOSE", "0") not in ("", "0"):
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with any error (a misspelt ``--config.key``, a value of the wrong
    type, an unknown variant) as one line on stderr and exit status 2, before anything loads."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl's flags.Error, and config_flags' AttributeError, KeyError ...
        print(f"error: {flag_error(e, argv)}", file=sys.stderr, flush=True)
        sys.exit(2)


def flag_error(e: Exception, argv: list[str]) -> str:
    """One line naming the flag at fault and the fix."""
    config = _StageConfigParser.last
    for arg in argv[1:]:
        if config is not None and arg.startswith("--config."):
            path = arg[len("--config.") :].split("=", 1)[0]
            if why := _missing_field(config, path):
                return f"--config.{path}: {why}"
    text = " ".join(str(e).replace("\\n", " ").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # a KeyError's repr
    return text or type(e).__name__


def _missing_field(config: Any, path: str) -> str | None:
    """Why ``path`` (``optim.lr``) names no field of ``config``, with the closest names."""
    import difflib

    node, done = config, []
    for part in path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(done) or "the config"
            close = difflib.get_close_matches(part, keys, n=1)
            fix = (
                f"did you mean --config.{'.'.join([*done, close[0]])}?"
                if close
                else f"the fields of {where} are {', '.join(sorted(keys))}"
            )
            return f"{where} has no field {part!r} (a misspelling?): {fix}"
        node, done = node[part], [*done, part]
    return None


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    if _CONFIG.value is None:  # the tiny curriculum: both CPU cores as XLA devices
        from sdxl_jax.train import curriculum

        curriculum.use_cpu_cores()
    from sdxl_jax import distributed

    try:  # before anything touches a device
        distributed.initialize(
            coordinator=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            local_device_ids=_LOCAL_DEVICE_IDS.value,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _COMPILE_CACHE.value:
        import jax

        jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    config = _CONFIG.value
    if config is None:
        from sdxl_jax.train import curriculum

        if _STOP_AT.value is not None:
            raise app.UsageError("--stop_at_step needs --config (it applies to one stage)")
        result = curriculum.run(_WORKDIR.value or "runs/tiny_curriculum")
        return 0 if result["status"] == "finished" else 1
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required with --config")
    from sdxl_jax.checkpoint import CheckpointError
    from sdxl_jax.train import loop
    from sdxl_jax.train.lock import WorkdirInUse

    if _EXPORT_STEP.value is not None:
        step = None if _EXPORT_STEP.value < 0 else _EXPORT_STEP.value
        try:
            out = loop.export_checkpoint(config, _WORKDIR.value, step, _EXPORT_TO.value)
        except (ValueError, FileNotFoundError, CheckpointError) as e:
            return _fail(f"error: {e}", 2)
        print(f"exported {out}", flush=True)
        return 0
    print(distributed.describe(), flush=True)
    try:
        result = loop.run_stage(config, _WORKDIR.value, stop_at_step=_STOP_AT.value)
    except (ValueError, FileNotFoundError, WorkdirInUse, CheckpointError) as e:
        return _fail(f"error: {e}", 2)
    except loop.Diverged as e:
        return _fail(f"error: {e}", 3)
    except BaseException:
        if not distributed.multi_process():
            raise
        import traceback

        return _fail(traceback.format_exc(), 1)
    return 0 if result.status in ("finished", "already finished", "stopped", "preempted") else 1


def _fail(message: str, code: int) -> int:
    from sdxl_jax import distributed

    print(message, file=sys.stderr, flush=True)
    if distributed.multi_process():
        # The other processes may wait in a collective for this one: leave at once (they see
        # its heartbeat stop) instead of in jax.distributed's shutdown barrier, which would
        # hold everyone until its timeout.
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
