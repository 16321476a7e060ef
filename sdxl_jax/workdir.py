"""A run's work directory, local or in a bucket (``gs://...``).

With a local ``--workdir`` everything lives there. With a remote one (any ``scheme://``, read
and written through ``etils.epath``: ``gs://`` needs ``gcsfs`` or TensorFlow installed):

- the checkpoints are written there directly by orbax (tensorstore speaks GCS natively);
- everything else (logs, TensorBoard, the final EMA, the export, prepared tiny data and caches)
  is written to a local mirror, ``$SDXL_LOCAL_DIR/<bucket>/<path>`` (default
  ``~/.cache/sdxl_jax/workdirs``), and uploaded by process 0 at every checkpoint and when a stage
  ends;
- a fresh host (a new VM after a preemption) downloads what it needs from the bucket first: the
  stage's own logs, so they continue, and the exports and final EMA weights of the stages it
  starts from.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

CHECKPOINTS = "checkpoints"
PROGRESS_EVERY_S = 10.0  # long copies redraw their progress bar at most this often


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def as_path(path: str | os.PathLike) -> Any:
    """A local ``Path``, or an ``etils.epath.Path`` for a URL (``gs://...``)."""
    if is_remote(path):
        from etils import epath

        return epath.Path(path)
    return Path(path)


def local_only(path: str | os.PathLike, flag: str) -> None:
    """Refuse a bucket URL where a command writes a local folder (rather than a folder named
    "gs:" here)."""
    if is_remote(path):
        raise ValueError(
            f"{flag} {path}: this writes a local folder; write it here, then copy it: "
            f"gcloud storage cp -r LOCAL {path}"
        )


def local_mirror(remote: str) -> Path:
    base = Path(os.environ.get("SDXL_LOCAL_DIR") or Path.home() / ".cache/sdxl_jax/workdirs")
    scheme, rest = str(remote).split("://", 1)
    return base / scheme / rest.strip("/")


class Workdir:
    """``root``: where the run lives (local path or URL); ``local``: where files are written
    (the root itself when local). ``remote`` may be given as any epath-able root (tests use a
    second local folder)."""

    def __init__(self, root: str | os.PathLike, *, local: str | os.PathLike | None = None):
        self.remote = is_remote(root) or local is not None
        if self.remote:
            from etils import epath

            self.root: Any = epath.Path(root)
            self.local = Path(local) if local is not None else local_mirror(str(root))
        else:
            self.root = self.local = Path(root)
        self._uploaded: dict[str, tuple[int, int]] = {}

    def __str__(self) -> str:
        return str(self.root)

    def checkpoints(self, stage: str) -> Any:
        """The stage's checkpoint folder (written in place, remote or not)."""
        return self.root / stage / CHECKPOINTS

    # -- mirror ------------------------------------------------------------------------------

    def upload(self, rel: str) -> int:
        """Copy local ``rel`` (file or folder) to the root where new or changed; the number of
        files copied. No-op for a local workdir. Call it on process 0."""
        if not self.remote:
            return 0
        src = self.local / rel
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        files = [f for f in files if self._uploaded.get(self._key(f)) != _version(f)]
        copied = 0
        for f in files:
            key, version = self._key(f), _version(f)  # before: a file growing meanwhile goes again
            dst = self.root / key
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(f, dst)
            self._uploaded[key] = version
            copied += 1
        return copied

    def _key(self, local_file: Path) -> str:
        return str(local_file.relative_to(self.local))

    def download(self, rel: str, *, skip: tuple[str, ...] = (), progress: bool = False) -> int:
        """Copy ``rel`` (file or folder) from the root to the local mirror unless already
        there; top-level entries named in ``skip`` are left out. The number of files copied.
        ``progress``: a bar on stderr (files, bytes, rate, ETA)."""
        if not self.remote:
            return 0
        src = self.root / rel
        if not src.exists():
            return 0
        if src.is_file():
            pairs = [(src, self.local / rel)]
        else:
            pairs = [
                (p, self.local / rel / "/".join(parts))
                for p, parts in _files(src)
                if parts[0] not in skip
            ]
        pairs = [(s, d) for s, d in pairs if not d.exists()]
        with _progress([s for s, _ in pairs], progress) as bar:
            for i, (s, d) in enumerate(pairs, 1):
                d.parent.mkdir(parents=True, exist_ok=True)
                tmp = d.with_name(f"{d.name}.part{os.getpid()}")  # processes may share the disk
                _copy(s, tmp, bar)
                tmp.rename(d)
                self._uploaded[self._key(d)] = _version(d)
                _files_done(bar, i, len(pairs))
        return len(pairs)

    def replace_local(self, rel: str) -> None:
        """Remove local ``rel`` (before it is written anew)."""
        path = self.local / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _copy(src: Any, dst: Any, bar: tqdm | None = None, chunk: int = 64 << 20) -> None:
    """Stream one file (local or bucket) to another, ``chunk`` bytes at a time."""
    with src.open("rb") as fi, dst.open("wb") as fo:
        while block := fi.read(chunk):
            fo.write(block)
            if bar is not None:
                bar.update(len(block))


def _progress(files: list[Any], enabled: bool) -> tqdm:
    """A bar on stderr for copying ``files``: bytes, rate, ETA, and the files done (the caller
    sets them with ``_files_done``)."""
    if not enabled:
        return tqdm(disable=True)  # no stat of every (remote) file for a total nobody sees
    return tqdm(
        total=sum(_size(f) for f in files),
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        mininterval=PROGRESS_EVERY_S,
        postfix=f"0/{len(files)} files",
    )


def _files_done(bar: tqdm, done: int, total: int) -> None:
    bar.set_postfix_str(f"{done}/{total} files", refresh=False)


def _version(local_file: Path) -> tuple[int, int]:
    """What tells a changed local file: (size, mtime in ns)."""
    st = local_file.stat()
    return st.st_size, st.st_mtime_ns


def _size(path: Any) -> int:
    """Bytes of a local file (``os.stat_result``) or a bucket object (``epath``'s StatResult)."""
    st = path.stat()
    return int(st.st_size if hasattr(st, "st_size") else st.length)


def publish(
    local: Path, url: str, *, last: str, skip: tuple[str, ...] = (), progress: bool = True
) -> int:
    """Upload a finished local folder to ``url``, file ``last`` (the file that marks it finished)
    at the end, top-level entries named in ``skip`` left out; a file already there at its size
    (an interrupted publish) is not sent again. The number of files sent."""
    remote = as_path(url)
    files = sorted(
        p for p in local.rglob("*")
        if p.is_file() and p.name != last and p.relative_to(local).parts[0] not in skip
    )  # fmt: skip
    todo = [f for f in files if not _same_size(f, remote / f.relative_to(local).as_posix())]
    send = [*todo, local / last]
    with _progress(send, progress) as bar:
        for i, f in enumerate(send, 1):
            dst = remote / f.relative_to(local).as_posix()
            dst.parent.mkdir(parents=True, exist_ok=True)
            _copy(f, dst, bar)
            _files_done(bar, i, len(send))
    return len(send)


def _same_size(local_file: Path, remote: Any) -> bool:
    return remote.exists() and _size(remote) == local_file.stat().st_size


def fetch(url: str) -> Path:
    """A local copy of a file or folder in a bucket (pretrained weights given as ``gs://...``):
    ``local_mirror(url)``, downloaded once per host (process 0 first; other hosts when they do
    not share its disk), file by file, so an interrupted fetch resumes. A local path is returned
    as it is."""
    if not is_remote(url):
        return Path(url)
    from sdxl_jax import distributed

    if not as_path(url).exists():  # every process checks: all fail alike, none waits
        raise FileNotFoundError(f"{url} does not exist (nothing to fetch)")
    local = local_mirror(url)
    done = local.parent / f".{local.name}.fetched"

    def build() -> None:
        print(f"fetching {url} -> {local}", flush=True)
        t = time.perf_counter()
        n = Workdir(url, local=local).download("", progress=True)
        size = sum(f.stat().st_size for f in ([local] if local.is_file() else local.rglob("*")))
        print(f"fetched {n} files, {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s",
              flush=True)  # fmt: skip
        done.write_text(url + "\n")

    distributed.lead_first(f"fetch {url}", done.exists, build)
    return local


def _files(folder: Any, parts: tuple[str, ...] = ()) -> list[tuple[Any, tuple[str, ...]]]:
    """(path, relative parts) of every file under ``folder``, one listing per folder (a bucket
    has no recursive glob)."""
    out = []
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.is_dir():
            out += _files(p, (*parts, p.name))
        else:
            out.append((p, (*parts, p.name)))
    return out


def move(src: Any, dst: Any) -> None:
    """Move a file or folder: a rename here, a copy then a delete in a bucket."""
    if not is_remote(src) and not is_remote(dst):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        return
    src, dst = as_path(str(src)), as_path(str(dst))
    pairs = _files(src) if src.is_dir() else [(src, ())]
    for p, parts in pairs:
        target = dst.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy(p, target)
    if src.is_dir():
        src.rmtree()
    else:
        src.unlink()
