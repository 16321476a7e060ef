"""``python -m tests.train.slow_peer [trainer flags]``: the trainer, with process 1 compiling its
first train step ``SDXL_TEST_SLOW_COMPILE_S`` seconds slower than the others, as a loaded or
smaller host does. The processes must still start that step together: on CPU a gloo
collective gives up when a peer is more than 30 s late."""

from __future__ import annotations

import os
import runpy
import time

import jax

from sdxl_jax.train.diffusion_task import DiffusionTask

_compile = DiffusionTask.compile_step
_delays = [float(os.environ.get("SDXL_TEST_SLOW_COMPILE_S", "40"))]


def _slow_compile(self, state, batch):
    if jax.process_index() == 1 and _delays:
        time.sleep(_delays.pop())
    return _compile(self, state, batch)


DiffusionTask.compile_step = _slow_compile
runpy.run_module("sdxl_jax.train", run_name="__main__", alter_sys=True)
