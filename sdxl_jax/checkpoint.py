"""Orbax checkpoints of a training stage: state, data-iterator state and metadata together.

One ``CheckpointManager`` per stage directory (``<workdir>/<stage>/checkpoints``). Each save is
a Composite of ``state`` (the whole TrainState: params, optimizer, EMA, step, rng),
``data`` (the data iterator's JSON state) and ``meta`` (JSON: config, stage, time). Orbax writes
into a temporary folder and renames it when complete, so a crash during a save leaves the
previous checkpoint the latest usable one. Restoring takes an abstract state whose leaves carry
the *new* shardings, so a checkpoint saved on one mesh restores onto another (fsdp=8 -> data=2 x
fsdp=4) or another host count. At the end of a stage, ``save_final_ema`` writes the EMA weights
alone, which is what the next stage's ``init_from`` and the exporter read.

Damage (a truncated, zeroed or deleted file) is found at restore: orbax reports what it cannot
read, and ``meta`` carries a digest of the state taken when it was saved (``digest``: integer
sums of the values' bits, exact on any mesh), so data that reads but differs is caught too. The
digest is part of the checkpoint itself, committed with it, so async saves stay async and a kill
mid-save leaves nothing half-verified. ``restore_newest`` falls back to the next older checkpoint
and moves the damaged one aside into ``<stage>/damaged/`` (never deleted); ``load_final_ema``
falls back to the EMA of the stage's last checkpoint, the same weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdxl_jax import distributed
from sdxl_jax import workdir as workdir_lib
from sdxl_jax.workdir import as_path

FINAL_EMA = "final_ema"
DAMAGED = "damaged"  # beside checkpoints/: where damaged checkpoints are moved (orbax never looks)
DIGEST_FILE = "sdxl_digest.json"  # inside final_ema/, written once its save is complete


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, and no other to fall back to."""


# -- digests -----------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bits as uint32 (8-byte values: two words, a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    small = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """[] uint32: the sum of the words. Integer sums wrap mod 2^32 in any order, so it is the
    same on every mesh; a zeroed or altered run of values changes it (but for a chance of
    2^-32; truncation and unreadable data orbax reports itself)."""
    return jnp.sum(_words(x), dtype=jnp.uint32)


@functools.lru_cache(maxsize=8)
def _digest_fn(out_sharding: Any) -> Callable[[list], jax.Array]:
    return jax.jit(
        lambda leaves: jnp.stack([_leaf_digest(x) for x in leaves]), out_shardings=out_sharding
    )


def _sums(leaves: list) -> np.ndarray:
    """[n] uint32: each leaf's digest, on the devices, in one program (every process of a job
    runs it; compiled once per run): what a save uses, cheap at any size."""
    if not leaves:
        return np.zeros(0, np.uint32)
    shardings = [getattr(x, "sharding", None) for x in leaves]
    mesh = next((s.mesh for s in shardings if isinstance(s, NamedSharding)), None)
    out = _digest_fn(NamedSharding(mesh, P()) if mesh is not None else None)(leaves)
    return np.asarray(jax.device_get(out), np.uint32)


def _host_words(a: np.ndarray) -> np.ndarray:
    """``_words`` on the host."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint32)
    if a.dtype.itemsize >= 4:
        return a.view(np.uint32)
    return a.view({1: np.uint8, 2: np.uint16}[a.dtype.itemsize]).astype(np.uint32)


def _host_sums(leaves: list) -> np.ndarray:
    """``_sums`` on the host, one shard at a time (this process's shards, each counted once;
    processes add theirs up): what a restore uses, so that it compiles nothing."""
    sums = np.zeros(len(leaves), np.uint64)
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        shards = (
            [s.data for s in x.addressable_shards if s.replica_id == 0]
            if isinstance(x, jax.Array)
            else [x]
        )
        for shard in shards:
            sums[i] += int(_host_words(np.asarray(shard)).sum(dtype=np.uint64) % 2**32)
    parts = distributed.gather("digest", (sums % 2**32).astype(np.uint32).tobytes().hex())
    total = sum(np.frombuffer(bytes.fromhex(p), np.uint32).astype(np.uint64) for p in parts)
    return (np.asarray(total, np.uint64) % 2**32).astype(np.uint32)


def _hex(sums: np.ndarray) -> str:
    return hashlib.sha256(sums.tobytes()).hexdigest()[:32]


def digest(tree: Any, *, on_device: bool = False) -> str:
    """A short hex digest of every value in ``tree`` (arrays, sharded or not), the same
    whatever the mesh and wherever computed; every process of a job computes it together."""
    leaves = [x for x in jax.tree.leaves(tree) if np.size(x)]
    return _hex(_sums(leaves) if on_device else _host_sums(leaves))


def state_digests(state: Any) -> dict[str, str]:
    """{"state": digest(state), "ema": digest(state.ema)}, from one pass over the state on its
    devices."""
    flat = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state) if np.size(x)]
    sums = _sums([x for _, x in flat])
    ema = np.array([getattr(p[0], "name", getattr(p[0], "key", None)) == "ema" for p, _ in flat])
    return {"state": _hex(sums), "ema": _hex(sums[ema] if len(ema) else sums)}


def _damage(what: str, meta: Any, key: str, tree: Any) -> str | None:
    """Why ``tree`` is damaged (its digest differs from the one saved in ``meta``), or None.
    Without a saved digest (saved before digests were written) it passes."""
    want = (meta or {}).get("digest", {}).get(key) if isinstance(meta, dict) else None
    if want and digest(tree) != want:
        return f"{what} reads back different values from those saved (digest mismatch)"
    return None


def _public(meta: Any) -> Any:
    """``meta`` as the caller saved it (without the digest added on save)."""
    return {k: v for k, v in meta.items() if k != "digest"} if isinstance(meta, dict) else meta


def _quiet_closed_loop() -> None:
    """After a failed restore, orbax's reads still in flight call back into its closed asyncio
    loop, each printing a traceback ("Event loop is closed"): drop those, keep the rest."""
    previous = sys.unraisablehook
    if getattr(previous, "sdxl_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.sdxl_quiet = True
    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    _quiet_closed_loop()
    """One short line for a restore error (orbax and tensorstore errors run to pages)."""
    while e.__cause__ is not None and str(e).startswith("Encountered error while reading"):
        e = e.__cause__
    text = str(e).strip().strip("'\"").replace("\\n", " ")
    text = text.split(" See full TensorStore details")[0].split("\n")[0]
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def warn(message: str) -> None:
    """A warning line on stderr, from process 0."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _agree(name: str, reason: str | None) -> str | None:
    return distributed.first_failure(name, reason)


# -- a stage's checkpoints -----------------------------------------------------------------------


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
        self.last_digests: tuple[int, dict[str, str]] | None = None  # (step, of its save)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data: dict, meta: dict, *, force: bool = False) -> bool:
        """Start saving (asynchronously); every process must call it. ``meta`` gains the
        state's digest (and its EMA's), saved in the same checkpoint."""
        self.last_digests = (step, state_digests(state))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave({**meta, "digest": self.last_digests[1]}),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data, meta) of ``step`` (default: the latest), placed per the shardings on
        ``abstract_state``'s leaves (``jax.ShapeDtypeStruct(..., sharding=...)``); raises
        :class:`CheckpointError` when its values differ from its saved digest."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint under {self.directory}/checkpoints")
        state, data, meta = self._read(abstract_state, step)
        if why := _damage(f"checkpoint step {step}", meta, "state", state):
            raise CheckpointError(why)
        return state, data, _public(meta)

    def _read(self, abstract_state: Any, step: int) -> tuple[Any, dict, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out.state, out.data, out.meta

    def restore_newest(
        self, abstract_state: Any, warn: Callable[[str], None] = warn
    ) -> tuple[Any, dict, dict, int] | None:
        """(state, data, meta, step) of the newest checkpoint that restores intact, None when
        there is none. Newer ones that fail to read or to match their digest are moved aside
        (``warn`` gets one line for each); when none restores, :class:`CheckpointError` names
        every step's problem and nothing is moved."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            out, why = None, None
            try:
                out = self._read(abstract_state, step)
            except Exception as e:  # orbax and tensorstore raise all kinds, even bare Exception
                why = _reason(e)
            why = _agree(f"restore {step}", why)  # every process falls back alike
            if why is None:
                why = _damage(f"step {step}", out[2], "state", out[0])
            if why is None:
                for bad, bad_why in failed:
                    moved = self.move_aside(bad)
                    warn(
                        f"warning: checkpoint step {bad} of {self.directory} is damaged "
                        f"({bad_why}); moved it to {moved}; resuming from step {step}"
                    )
                return out[0], out[1], _public(out[2]), step
            failed.append((step, why))
        if failed:
            listed = "; ".join(f"step {s}: {w}" for s, w in failed)
            raise CheckpointError(
                f"no checkpoint under {self.directory}/checkpoints restores ({listed}). If the "
                f"config changed since they were saved, run with the settings that saved them "
                f"(meta/ of a checkpoint has them); to start the stage over, move "
                f"{self.directory}/checkpoints away"
            )
        return None

    def move_aside(self, step: int) -> Any:
        """Move checkpoint ``step`` to ``<stage>/damaged/`` (process 0; every process calls it)
        and forget it; returns where it went."""
        src = self.directory / "checkpoints" / str(step)
        dst = self.directory / DAMAGED / f"checkpoint-{step}-{_stamp()}"
        _move_aside(src, dst)
        self.manager.reload()
        return dst

    def restore_ema(self, abstract_params: Any, step: int) -> tuple[Any, dict]:
        """(the EMA weights alone, meta) of checkpoint ``step``, checked against its digest."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta.meta
        item = {"ema": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        path = self.directory / "checkpoints" / str(step) / "state"
        ema = ocp.PyTreeCheckpointer().restore(path, args=args)["ema"]
        if why := _damage(f"checkpoint step {step}", meta, "ema", ema):
            raise CheckpointError(why)
        return ema, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any received a preemption notice (e.g. SIGTERM on TPU)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- the stage's result ---------------------------------------------------------------

    def save_final_ema(self, ema: Any, step: int | None = None) -> Path:
        """The EMA weights alone under ``<stage>/final_ema`` (atomic, like every save), then
        their digest beside them (``sdxl_digest.json``): the one of the save of ``step`` when
        that was this object's last save (the same weights), else computed."""
        last = self.last_digests
        want = last[1]["ema"] if last and last[0] == step else digest(ema, on_device=True)
        path = self.directory / FINAL_EMA
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, ema, force=True)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            (path / DIGEST_FILE).write_text(json.dumps({"ema": want}))
        return path


def _move_aside(src: Any, dst: Any) -> None:
    """Process 0 moves ``src`` to ``dst``; every process waits for it."""
    failure = None
    if jax.process_index() == 0:
        try:
            workdir_lib.move(src, dst)
        except OSError as e:
            failure = f"{type(e).__name__}: {e}"
    if failure := _agree(f"move {src}", failure):
        raise CheckpointError(
            f"{src} is damaged and could not be moved aside to {dst} ({failure}): move it "
            f"out of the way yourself (keep it, or delete it), then rerun"
        )


def _final_step(meta: dict) -> int | None:
    """The step a stage ends at, from a checkpoint's meta (its config)."""
    try:
        optim = meta["config"]["optim"]
        return int(optim["total_steps"]) * int(optim.get("accumulate", 1))
    except (KeyError, TypeError, ValueError):
        return None


def _ema_of_last_checkpoint(stage_dir: Path, abstract_params: Any) -> tuple[Any, int] | None:
    """(EMA, step) of the stage's last checkpoint when it is the stage's final step and reads
    back intact: the weights ``final_ema/`` holds."""
    if not (stage_dir / "checkpoints").is_dir():
        return None
    ckpts = StageCheckpoints(stage_dir)
    try:
        step = ckpts.latest_step()
        if step is None:
            return None
        try:
            ema, meta = ckpts.restore_ema(abstract_params, step)
            final = _final_step(meta)
            why = None if final is not None and step >= final else "not the stage's last step"
        except Exception as e:
            ema, why = None, _reason(e)
        return (ema, step) if _agree(f"ema {step}", why) is None else None
    finally:
        ckpts.close()


def load_final_ema(
    stage_dir: str | Path, abstract_params: Any, warn: Callable[[str], None] = warn
) -> Any:
    """A previous stage's final EMA weights, placed per ``abstract_params``' shardings (the
    ``init_from`` of the next stage). Damaged (unreadable, or differing from its digest) or
    missing, they come from the stage's last checkpoint instead, with a warning; a damaged
    folder is moved to ``<stage>/damaged/``."""
    stage_dir = Path(stage_dir).absolute()
    path = stage_dir / FINAL_EMA
    why = None
    if path.exists():
        ema = None
        try:
            ema = ocp.StandardCheckpointer().restore(path, abstract_params)
        except Exception as e:
            why = _reason(e)
        if (why := _agree(f"final ema {path}", why)) is None:
            saved = json.loads((path / DIGEST_FILE).read_text()) if (
                path / DIGEST_FILE).is_file() else {}  # fmt: skip
            if (why := _damage(str(path), {"digest": saved}, "ema", ema)) is None:
                return ema
    found = _ema_of_last_checkpoint(stage_dir, abstract_params)
    if found is None and why is None:
        raise FileNotFoundError(
            f"{path} does not exist: the stage at {stage_dir} has not finished (its final EMA "
            f"weights are written when it ends); finish it or point init_from elsewhere"
        )
    if found is None:
        raise CheckpointError(
            f"{path} is damaged ({why}) and the stage has no intact checkpoint of its last "
            f"step to take the weights from: rerun that stage to write them again, or point "
            f"init_from elsewhere"
        )
    ema, step = found
    if why is None:
        warn(f"warning: {path} is missing; using the EMA of checkpoint step {step} (the same)")
        return ema
    moved = stage_dir / DAMAGED / f"{FINAL_EMA}-{_stamp()}"
    _move_aside(path, moved)
    warn(
        f"warning: {path} is damaged ({why}); moved it to {moved}; using the EMA of checkpoint "
        f"step {step} (the same weights)"
    )
    return ema


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or abstract) carrying ``shardings`` (same tree)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
