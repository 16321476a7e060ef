"""What the train loop needs from a stage's model: the contract between the loop and a task.

A *task* owns the models of one stage (the diffusion UNet with its frozen encoders, or the
autoencoder with its discriminator) and knows how to create, step, preview and export them. The
loop (:mod:`sdxl_jax.train.loop`) owns everything else: mesh, data, checkpoints, logging,
preemption, the non-finite-step limit. The state a task returns is a pytree (a flax
``struct.dataclass``) with at least these fields, all replicated scalars but ``ema``:

- ``step``: [] int32, train-step calls so far (batches consumed, skipped ones included);
- ``skipped``: [] int32, steps whose update was dropped because something was not finite;
- ``bad_streak``: [] int32, how many of those came in a row, up to now;
- ``ema``: the EMA weights, what the stage hands to the next one and exports.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np


class Task(Protocol):
    #: host-batch keys the step reads (arrays only); the loop sends exactly these to devices.
    batch_keys: tuple[str, ...]

    def abstract_state(self) -> Any:
        """The state as ``jax.ShapeDtypeStruct`` leaves carrying their shardings (for restore)."""

    def init_state(self) -> Any:
        """A fresh state, created already sharded: random init, or the ``init_from`` weights."""

    def step(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """One train step (jitted, the state donated); metrics are scalars, ``loss`` among them."""

    def compile_step(self, state: Any, batch: Mapping[str, jax.Array]) -> None:
        """Compile (not run) the step for this batch's shapes; a later ``step`` reuses it. The
        loop calls it before the first step of each shape when several processes must start
        that step together."""

    def preview(self, state: Any) -> np.ndarray | None:
        """A uint8 image grid [H, W, 3] showing progress (samples, reconstructions), or None."""

    def export(self, state: Any, out: Path) -> Path:
        """Write the EMA weights where the next stage and users read them; returns the folder."""
