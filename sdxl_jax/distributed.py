"""Start-up of a multi-process JAX program: one call before anything touches a device.

``python -m sdxl_jax.train`` runs as one JAX program over every process of a job; this module
decides how the processes find each other and starts ``jax.distributed``:

- explicit: ``--coordinator HOST:PORT --num_processes N --process_id I`` (flags), or the
  environment ``SDXL_COORDINATOR`` / ``SDXL_NUM_PROCESSES`` / ``SDXL_PROCESS_ID`` (JAX's own
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` work too). This is
  how ``launch/local.sh`` starts N processes on one machine, and works anywhere else.
- SLURM (``srun``): detected from ``SLURM_*``. JAX's own detection assumes one GPU per process
  (it sets ``local_device_ids=[SLURM_LOCALID]``), so the local devices are set here: one task
  per node takes all of the node's GPUs; one task per GPU takes its own (``SLURM_LOCALID``, or
  GPU 0 when SLURM bound one GPU to the task). ``SDXL_LOCAL_DEVICE_IDS`` / ``--local_device_ids``
  override.
- Cloud TPU VM: JAX detects the pod's workers itself (``jax.distributed.initialize()`` with no
  arguments); a single-host TPU VM starts the same way.
- otherwise one process: nothing is started.

With several processes on CPU the collectives use gloo. ``resolve`` is a pure function of the
environment and the flags (tested without starting anything); ``initialize`` applies it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ENV = {
    "coordinator": ("SDXL_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("SDXL_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("SDXL_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("SDXL_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}
_SLURM_NEEDED = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Startup:
    """How this process joins the job. ``mode``: single | explicit | slurm | tpu."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    reason: str = ""

    @property
    def multi(self) -> bool:
        return self.mode != "single"


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).replace(" ", "").split(",") if x != "")
    except ValueError:
        raise ValueError(
            f"local device ids {text!r}: use a comma-separated list of integers, e.g. 0,1"
        ) from None


def _from_env(env: Mapping[str, str], key: str) -> tuple[str | None, str | None]:
    for name in ENV[key]:
        if env.get(name, "") != "":
            return env[name], name
    return None, None


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """SLURM's tasks on this node: SLURM_NTASKS_PER_NODE, or this node's entry of
    SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE (``"4(x2),2"``)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else counts[-1]


def _gpus_visible(env: Mapping[str, str]) -> int | None:
    """GPUs this task can see, from the environment alone (before JAX starts a backend)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in ("", "all"):
        return len([x for x in visible.split(",") if x.strip() != ""])
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(name):
            m = re.search(r"(\d+)$", env[name].split(",")[0])  # "8" or "h100:8"
            if m:
                return int(m.group(1))
    return None


def _slurm_devices(env: Mapping[str, str]) -> tuple[tuple[int, ...] | None, str]:
    per_node = _tasks_per_node(env)
    gpus = _gpus_visible(env)
    local = int(env["SLURM_LOCALID"])
    if gpus is None:
        # No GPUs in sight (a CPU job, or GPUs not requested through SLURM): leave it to JAX.
        return (local,) if (per_node or 1) > 1 else None, "no GPU count in the environment"
    if gpus == 1:
        return (0,), "one GPU visible to this task"
    if per_node in (None, 1):
        return tuple(range(gpus)), f"one task per node with {gpus} GPUs"
    if per_node == gpus:
        return (local,), f"one task per GPU ({per_node} per node)"
    raise ValueError(
        f"SLURM: {per_node} tasks per node but {gpus} GPUs visible to each: run one task per "
        f"node (--ntasks-per-node=1) or one per GPU (--ntasks-per-node={gpus}), or set "
        f"SDXL_LOCAL_DEVICE_IDS for each task"
    )


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: TPU chips on the PCI bus or accel devices, and libtpu installed."""
    accel = Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()
    if not accel:
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def resolve(
    env: Mapping[str, str] | None = None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    tpu: bool | None = None,
) -> Startup:
    """The start-up plan from flags (first) and the environment. Raises ValueError naming the
    missing or inconsistent setting."""
    env = os.environ if env is None else env
    given = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    source = {k: "--" + k for k, v in given.items() if v is not None}
    for key in given:
        if given[key] is None:
            value, name = _from_env(env, key)
            if value is not None:
                given[key] = value if key == "coordinator" else _int(name, value)
                source[key] = name
    if local_device_ids is None:
        value, _ = _from_env(env, "local_device_ids")
        local_device_ids = value
    ids = None
    if local_device_ids is not None:
        ids = (
            _ids(local_device_ids)
            if isinstance(local_device_ids, str)
            else tuple(int(i) for i in local_device_ids)
        )

    if any(v is not None for v in given.values()):
        n, i, addr = given["num_processes"], given["process_id"], given["coordinator"]
        if n is not None and n < 1:
            raise ValueError(f"num_processes {n}: need at least 1")
        if n == 1 and addr is None:
            return Startup("single", num_processes=1, process_id=0, reason="one process")
        missing = [k for k, v in given.items() if v is None]
        if missing:
            have = ", ".join(f"{k} from {source[k]}" for k in source)
            raise ValueError(
                f"multi-process start-up: {have} given, but not {', '.join(missing)}: set all "
                f"three (--coordinator HOST:PORT --num_processes N --process_id I, or "
                f"SDXL_COORDINATOR / SDXL_NUM_PROCESSES / SDXL_PROCESS_ID)"
            )
        if not 0 <= i < n:
            raise ValueError(f"process_id {i} is not in [0, {n}): ids run from 0 to N-1")
        if ":" not in addr:
            raise ValueError(f"coordinator {addr!r}: use HOST:PORT, e.g. 10.0.0.2:1234")
        return Startup("explicit", addr, n, i, ids, reason="explicit coordinator")

    if all(env.get(k) for k in _SLURM_NEEDED) and int(env["SLURM_NTASKS"]) > 1:
        reason = "SLURM"
        if ids is None:
            ids, why = _slurm_devices(env)
            reason = f"SLURM: {why}"
        return Startup(
            "slurm",
            num_processes=int(env["SLURM_NTASKS"]),
            process_id=int(env["SLURM_PROCID"]),
            local_device_ids=ids,
            reason=reason,
        )

    if on_cloud_tpu_vm() if tpu is None else tpu:
        return Startup("tpu", local_device_ids=ids, reason="Cloud TPU VM (JAX detects the workers)")
    return Startup("single", num_processes=1, process_id=0, reason="no coordinator, SLURM or TPU")


_started: Startup | None = None


def initialize(plan: Startup | None = None, **flags) -> Startup:
    """Start ``jax.distributed`` per ``plan`` (default: ``resolve(**flags)``). Idempotent; must
    run before JAX initialises a backend (anything that lists or uses devices)."""
    global _started
    if _started is not None:
        return _started
    plan = resolve(**flags) if plan is None else plan
    if plan.multi:
        import jax

        # Multi-process CPU collectives (harmless on GPU/TPU: only the CPU backend uses them).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = dict(
            local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None
        )
        if plan.mode == "explicit":
            kwargs.update(
                coordinator_address=plan.coordinator,
                num_processes=plan.num_processes,
                process_id=plan.process_id,
            )
        jax.distributed.initialize(**kwargs)
    _started = plan
    return plan


def describe(plan: Startup | None = None) -> str:
    """One line per process: who it is, its devices, what it writes."""
    import jax

    plan = plan or _started or Startup("single")
    i, n = jax.process_index(), jax.process_count()
    local, total = jax.local_device_count(), jax.device_count()
    kind = jax.devices()[0].platform
    writes = (
        "TensorBoard, metrics.jsonl, samples, exports, summaries and its checkpoint shards"
        if i == 0
        else "its checkpoint shards only (process 0 writes logs, samples and exports)"
    )
    return (
        f"process {i}/{n} on {os.uname().nodename} ({plan.reason}): {local} of {total} "
        f"{kind} devices; writes {writes}"
    )


def multi_process() -> bool:
    """True once this process joined a job of several."""
    return _started is not None and _started.multi


BARRIER_TIMEOUT_S = float(os.environ.get("SDXL_BARRIER_TIMEOUT_S", 3600))
_barriers = 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (no-op with one process).

    The wait is the coordination service's (``SDXL_BARRIER_TIMEOUT_S``, default an hour: process
    0 may be building a latent cache meanwhile), not a device collective: on CPU a gloo
    collective gives up when its peers are 30 s late, which a slower host easily is."""
    import jax

    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client has no public handle

    _barriers += 1  # every process calls the same barriers in the same order
    jax_distributed.global_state.client.wait_at_barrier(
        f"sdxl:{_barriers}:{name}", int(BARRIER_TIMEOUT_S * 1000)
    )


def lead_first(name: str, done: Callable[[], bool], build: Callable[[], object]) -> None:
    """Make something on disk once for the whole job: process 0 builds it unless ``done()``,
    every process waits, then a process that still does not see it (a host whose disk is not
    shared) builds its own copy. ``build`` must be deterministic."""
    import jax

    if jax.process_index() == 0 and not done():
        build()
    barrier(f"{name}:built")
    if jax.process_index() != 0 and not done():
        build()
    barrier(f"{name}:ready")


def gather(name: str, text: str) -> list[str]:
    """Every process's ``text`` for the same step (``name``), in process order, on every
    process: through the coordination service, not a device collective. One process: [text]."""
    import jax

    global _barriers
    if jax.process_count() == 1:
        return [text]
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    _barriers += 1
    key = f"sdxl:{_barriers}:{name}"
    client.key_value_set(f"{key}:{jax.process_index()}", "x" + text)  # never empty
    client.wait_at_barrier(key, int(BARRIER_TIMEOUT_S * 1000))
    timeout = int(BARRIER_TIMEOUT_S * 1000)
    return [
        client.blocking_key_value_get(f"{key}:{i}", timeout)[1:] for i in range(jax.process_count())
    ]


def first_failure(name: str, failure: str | None) -> str | None:
    """Every process's outcome of the same attempt (``failure``: why it failed, None: it
    worked) -> the first failure of any process ("process I: why" with several), the same on
    every process (None when all worked), so that all of them go on alike."""
    got = gather(name, failure or "")
    if len(got) == 1:
        return failure
    return next((f"process {i}: {why}" for i, why in enumerate(got) if why), None)
