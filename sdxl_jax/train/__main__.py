"""``python -m sdxl_jax.train``: train one stage, or (no arguments) the tiny curriculum.

  python -m sdxl_jax.train --config experiments/base_256.py --workdir gs://BUCKET/run
  python -m sdxl_jax.train --config experiments/base_256.py:tiny --workdir /tmp/run \\
      --config.optim.lr=3e-4 --config.data.global_batch_size=64
  python -m sdxl_jax.train            # the whole tiny curriculum on CPU, then its scores

The config is locked: a misspelt ``--config.key`` fails before anything runs. Rerunning a command
resumes from its stage's latest checkpoint. See ``--helpfull`` for every flag.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "A stage config: experiments/<stage>.py[:variant], e.g. experiments/base_256.py:tiny. "
    "Override fields with --config.key=value. Omitted: the tiny curriculum on CPU.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run folder (local or gs://); each stage writes <workdir>/<stage>/. Default with no "
    "--config: runs/tiny_curriculum.",
)
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "Save a checkpoint at this step and exit (as a preemption would)."
)


_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/sdxl_jax/xla")),
    "Persistent XLA compilation cache: a rerun or resume skips compiling ('' to disable).",
)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
    from sdxl_jax.train import loop

    try:
        result = loop.run_stage(config, _WORKDIR.value, stop_at_step=_STOP_AT.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0 if result.status in ("finished", "already finished", "stopped", "preempted") else 1


if __name__ == "__main__":
    app.run(main)
