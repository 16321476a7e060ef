"""One run at a time per stage: :class:`StageLock` holds ``<workdir>/<stage>/lock.json`` (host,
pid, start time, a heartbeat) while a run trains the stage; in the bucket itself for a bucket
workdir (``gs://``), where every host sees it.

Two trainers on one stage would race orbax for the same checkpoint steps and interleave their
logs; the second is refused at once, with the holder named. A crashed run's lock does not block
the rerun: on the same host its pid is checked; from another host, a lock whose heartbeat stopped
``LOCK_STALE_S`` ago is a dead run's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sdxl_jax.workdir import as_path, is_remote

LOCK_FILE = "lock.json"
# The holder rewrites its lock this often; a lock unchanged for LOCK_STALE_S is a dead run's
# (a host that crashed: its pid cannot be checked from another host).
LOCK_HEARTBEAT_S = float(os.environ.get("SDXL_LOCK_HEARTBEAT_S", 60))
LOCK_STALE_S = float(os.environ.get("SDXL_LOCK_STALE_S", 600))


class WorkdirInUse(RuntimeError):
    """Another run holds the stage's lock."""


class StageLock:
    """``<root>/<stage>/lock.json``: which run trains the stage (host, pid, start time, token,
    heartbeat). ``acquire`` refuses at once, naming the holder, while that run lives; a lock
    left by a run that is gone (same host and its pid not alive, or no heartbeat for
    ``LOCK_STALE_S``) is taken over with a warning. Local files are created with a hard link
    (atomic); bucket objects with a generation precondition (create only if absent, replace or
    delete only the generation read). Use it on one process of a job."""

    def __init__(self, root: Any, stage: str, warn: Any = None):
        self.path = as_path(str(root)) / stage / LOCK_FILE
        self.file = _lock_file(self.path)
        self.token, self.held, self.lost = uuid.uuid4().hex, False, False
        self.warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> bytes:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
            "started_s": self.started, "heartbeat_s": time.time(), "token": self.token,
            "command": " ".join(sys.argv)[:500],
        }).encode()  # fmt: skip

    def acquire(self) -> StageLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            taken = self.file.create(self.record())
        except OSError as e:
            raise ValueError(
                f"workdir: cannot write {self.path.parent} ({e.strerror or e}): choose a "
                f"--workdir you can write to, or fix its permissions"
            ) from None
        for _ in range(5):
            if taken:
                break
            current = self.file.read()
            if current is None:  # released meanwhile
                taken = self.file.create(self.record())
                continue
            holder = _parse(current[0])
            why = stale(holder)
            if why is None:
                raise WorkdirInUse(_held(self.path, holder))
            taken = self.file.replace(self.record(), current[1])
            if taken:
                self.warn(f"warning: took over the lock {self.path} of {_who(holder)}: {why}")
        if not taken:
            raise WorkdirInUse(f"{self.path}: other runs keep taking this lock; try again")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="stage-lock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                current = self.file.read()
                if current is None or _parse(current[0]).get("token") != self.token:
                    self.lost = True
                    self.warn(f"warning: lost the lock {self.path}: another run took it over")
                    return
                self.file.replace(self.record(), current[1])
            except Exception as e:  # a bucket's hiccup: the next beat tries again
                self.warn(f"warning: could not refresh the lock {self.path}: {e}")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self.file.read()
            if current is not None and _parse(current[0]).get("token") == self.token:
                self.file.delete(current[1])
        except Exception as e:
            self.warn(f"warning: could not remove the lock {self.path}: {e}")


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _pid_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot; Linux), to tell a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: Any, started: Any) -> bool:
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (TypeError, ValueError, OSError):
        return False
    now = _pid_start(pid)
    if now is not None and started is not None and now != started:
        return False  # the pid was reused
    try:  # a zombie (killed, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale(holder: dict, now: float | None = None) -> str | None:
    """Why the lock ``holder`` is a dead run's, or None while it may be alive."""
    if not holder:
        return "the lock file is unreadable"
    if holder.get("host") == socket.gethostname() and not _alive(
        holder.get("pid"), holder.get("pid_start")
    ):
        return f"process {holder.get('pid')} is no longer running"
    age = (now or time.time()) - float(holder.get("heartbeat_s", 0))
    if age > LOCK_STALE_S:
        return f"no heartbeat for {age:.0f} s (over {LOCK_STALE_S:.0f} s)"
    return None


def _who(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


def _held(path: Any, holder: dict) -> str:
    beat = time.time() - float(holder.get("heartbeat_s", 0))
    return (
        f"{path.parent} is in use by {_who(holder)}, last heartbeat {beat:.0f} s ago: two runs "
        f"on one stage would mix its checkpoints and logs; wait for that run to end or stop it "
        f"(if it is gone, its lock {path} expires {LOCK_STALE_S:.0f} s after its last "
        f"heartbeat, or delete it)"
    )


def _lock_file(path: Any) -> Any:
    if str(path).startswith("gs://"):
        return _BucketLockFile(str(path))
    if is_remote(path):
        return _PlainLockFile(path)
    return _LocalLockFile(Path(str(path)))


class _LocalLockFile:
    """Created by hard-linking a complete temporary file (atomic, never half-written); replaced
    and deleted under an exclusive ``flock`` of a guard file, only if unchanged since read."""

    def __init__(self, path: Path):
        self.path, self.guard = path, path.with_name(f".{path.name}.guard")

    def _tmp(self, data: bytes) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        return tmp

    def create(self, data: bytes) -> bool:
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    def _if_unchanged(self, version: bytes, act: Any) -> bool:
        import fcntl

        with open(self.guard, "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current[1] != version:
                return False
            act()
            return True

    def replace(self, data: bytes, version: bytes) -> bool:
        tmp = self._tmp(data)
        try:
            return self._if_unchanged(version, lambda: os.replace(tmp, self.path))
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, version: bytes) -> bool:
        return self._if_unchanged(version, self.path.unlink)


class _BucketLockFile:
    """A gs:// object written with generation preconditions: created only if absent
    (``ifGenerationMatch=0``), deleted only at the generation read (a replace is a delete and
    a create: a run that slips in between wins, the replacer loses)."""

    def __init__(self, url: str):
        import fsspec

        self.fs = fsspec.filesystem("gs")
        self.path = url.removeprefix("gs://")
        self.bucket, _, self.key = self.path.partition("/")

    def create(self, data: bytes) -> bool:
        if self.read() is not None:  # (also where preconditions are not enforced: emulators)
            return False
        try:
            self.fs.pipe_file(self.path, data, mode="create")
            return True
        except FileExistsError:  # 412: it exists
            return False

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            generation = self.fs.info(self.path)["generation"]
            return self.fs.cat_file(self.path), str(generation)
        except FileNotFoundError:
            return None

    def delete(self, version: str) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
            return True
        except (FileExistsError, FileNotFoundError):  # 412: changed since read; 404: gone
            return False
        finally:
            self.fs.invalidate_cache(self.path)

    def replace(self, data: bytes, version: str) -> bool:
        return self.delete(version) and self.create(data)


class _PlainLockFile:
    """Another kind of remote folder (etils.epath): no preconditions, best effort."""

    def __init__(self, path: Any):
        self.path = path

    def create(self, data: bytes) -> bool:
        if self.path.exists():
            return False
        self.path.write_bytes(data)
        return True

    def read(self) -> tuple[bytes, bytes] | None:
        return (data, data) if self.path.exists() and (data := self.path.read_bytes()) else None

    def replace(self, data: bytes, version: bytes) -> bool:
        self.path.write_bytes(data)
        return True

    def delete(self, version: bytes) -> bool:
        self.path.unlink()
        return True
