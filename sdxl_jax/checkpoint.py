"""Orbax checkpoints of a training stage: state, data-iterator state and metadata together.

One ``CheckpointManager`` per stage directory (``<workdir>/<stage>/checkpoints``). Each save is
a Composite of ``state`` (the whole TrainState: params, optimizer, EMA, step, rng),
``data`` (the data iterator's JSON state) and ``meta`` (JSON: config, stage, time). Orbax writes
into a temporary folder and renames it when complete, so a crash during a save leaves the
previous checkpoint the latest usable one. Restoring takes an abstract state whose leaves carry
the *new* shardings, so a checkpoint saved on one mesh restores onto another (fsdp=8 -> data=2 x
fsdp=4) or another host count. At the end of a stage, ``save_final_ema`` writes the EMA weights
alone, which is what the next stage's ``init_from`` and the exporter read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sdxl_jax.workdir import as_path

FINAL_EMA = "final_ema"


class StageCheckpoints:
    """Save and restore one stage's checkpoints."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        # a local folder, or a bucket URL (gs://...: orbax writes there directly)
        path = as_path(directory)
        self.directory = path.absolute() if isinstance(path, Path) else path
        self.manager = ocp.CheckpointManager(
            self.directory / "checkpoints",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict, meta: dict, *, force: bool = False) -> bool:
        """Start saving (asynchronously); every process must call it."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data, meta) of ``step`` (default: the latest), placed per the shardings on
        ``abstract_state``'s leaves (``jax.ShapeDtypeStruct(..., sharding=...)``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint under {self.directory}/checkpoints")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out.state, out.data, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any received a preemption notice (e.g. SIGTERM on TPU)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- the stage's result ---------------------------------------------------------------

    def save_final_ema(self, ema: Any) -> Path:
        """The EMA weights alone under ``<stage>/final_ema`` (atomic, like every save)."""
        path = self.directory / FINAL_EMA
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, ema, force=True)
        checkpointer.wait_until_finished()
        return path


def load_final_ema(stage_dir: str | Path, abstract_params: Any) -> Any:
    """A previous stage's final EMA weights, placed per ``abstract_params``' shardings (the
    ``init_from`` of the next stage)."""
    path = Path(stage_dir).absolute() / FINAL_EMA
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the stage at {stage_dir} has not finished (its final EMA "
            f"weights are written when it ends); finish it or point init_from elsewhere"
        )
    return ocp.StandardCheckpointer().restore(path, abstract_params)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or abstract) carrying ``shardings`` (same tree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
