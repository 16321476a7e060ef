"""A local Google Cloud Storage server for the tests (``gcp-storage-emulator``, the GCS JSON API
over HTTP): ``gs://`` paths then go through the same clients a real bucket does (gcsfs under
etils.epath for files, tensorstore's GCS driver for orbax's arrays, google-cloud-cpp inside
ArrayRecord's reader for TFDS records), pointed at it by environment variables that child
processes inherit.

One gap of the emulator is filled here, as GCS behaves: media downloads carry the object's
``x-goog-generation`` (tensorstore reads it to version OCDBT manifests; without it an orbax save
over an earlier one fails with "Malformed StorageGeneration"). Still unlike GCS: preconditions
(``ifGenerationMatch``) are not enforced, so concurrent writers are not tested against it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BUCKET = "sdxl-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log: Path, timeout: float = 30.0) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start the server with bucket ``BUCKET``, objects in its memory, its output in ``log``:
    (process, the environment that points clients at it). The caller stops it (``stop``)."""
    port = _free_port()
    out = open(log, "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(
        [sys.executable, __file__, "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", BUCKET, "--in-memory", "--quiet"],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"GCS emulator did not start: see {log}") from None
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath's gs:// backend without TensorFlow)
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays (tensorstore)
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp in ArrayRecord's reader
        # gcsfs's hierarchical-namespace probe uses an API the emulator lacks (and credentials)
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def set_environ(env: dict[str, str]) -> dict[str, str | None]:
    """Point this process at the server; returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_environ(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload(folder: Path, url: str) -> Any:
    """Copy a local folder's files to ``url`` (gs://...): the bucket path."""
    from etils import epath

    dst = epath.Path(url)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            (dst / f.relative_to(folder).as_posix()).write_bytes(f.read_bytes())
    return dst


def _serve(argv: list[str]) -> int:
    """The emulator's command line, with generation headers on media downloads."""
    from gcp_storage_emulator import __main__ as emulator
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        if response.status.value < 300:
            p = request.params
            obj = storage.get_file_obj(p["bucket_name"], p["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download  # objects.get(alt=media) calls it by name
    server.HANDLERS = tuple(
        (pattern, {m: download if f is plain else f for m, f in methods.items()})
        for pattern, methods in server.HANDLERS
    )
    return emulator.main(argv)


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))


def copy_tree(src: Any, dst: Any, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under ``src`` to ``dst`` (bucket or local epath), leaving out those whose
    path relative to ``src`` starts with an entry of ``skip``; the number of files copied."""
    n = 0
    for p in sorted(src.iterdir(), key=lambda q: q.name):
        rel_skip = tuple(
            s.split("/", 1)[1] for s in skip if s.split("/", 1)[0] == p.name and "/" in s
        )
        if p.name in skip:
            continue
        if p.is_dir():
            n += copy_tree(p, dst / p.name, rel_skip)
        else:
            (dst / p.name).write_bytes(p.read_bytes())
            n += 1
    return n
