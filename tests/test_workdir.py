"""Bucket workdirs: the local mirror, uploads of what changed, downloads to a fresh host. The
bucket is a gs:// bucket on a local GCS server (tests/gcs.py: the real gcsfs client under
etils.epath), and a second local folder reached through etils.epath."""

import os
import re
import time

import pytest
from etils import epath

from sdxl_jax import workdir as wl


@pytest.fixture(params=["gs", "folder"])
def bucket(request, tmp_path):
    if request.param == "gs":
        return epath.Path(f"{request.getfixturevalue('gcs_bucket')}/{tmp_path.name}")
    return epath.Path(tmp_path / "bucket")


def test_remote_detection_and_mirror_location(monkeypatch, tmp_path):
    assert wl.is_remote("gs://bucket/run") and not wl.is_remote("/tmp/run")
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path))
    assert wl.local_mirror("gs://bucket/a/run/") == tmp_path / "gs" / "bucket" / "a" / "run"
    local = wl.Workdir(tmp_path / "plain")
    assert not local.remote and local.root == local.local == tmp_path / "plain"
    assert local.upload("x") == 0 and local.download("x") == 0


def test_upload_copies_new_and_changed_files_only(bucket, tmp_path):
    wd = wl.Workdir(bucket, local=tmp_path / "host")
    stage = tmp_path / "host" / "base"
    (stage / "tb").mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("a\n")
    (stage / "tb" / "events").write_bytes(b"\x00\x01")
    assert wd.upload("base") == 2
    assert (bucket / "base" / "tb" / "events").read_bytes() == b"\x00\x01"
    assert wd.upload("base") == 0  # nothing changed
    time.sleep(0.01)
    with open(stage / "metrics.jsonl", "a") as f:
        f.write("b\n")
    assert wd.upload("base") == 1
    assert (bucket / "base" / "metrics.jsonl").read_text() == "a\nb\n"


def test_a_fresh_host_downloads_all_but_what_is_skipped(bucket, tmp_path):
    for rel, text in {
        "base/metrics.jsonl": "1\n",
        "base/checkpoints/5/x": "big",
        "base/export/unet/config.json": "{}",
        "base/final_ema/d": "w",
    }.items():
        (bucket / rel).parent.mkdir(parents=True, exist_ok=True)
        (bucket / rel).write_text(text)  # fmt: skip
    fresh = wl.Workdir(bucket, local=tmp_path / "new_host")
    assert fresh.download("base", skip=("checkpoints", "final_ema")) == 2
    host = tmp_path / "new_host" / "base"
    assert (host / "metrics.jsonl").read_text() == "1\n"
    assert (host / "export" / "unet" / "config.json").exists()
    assert not (host / "checkpoints").exists() and not (host / "final_ema").exists()
    assert fresh.download("base/final_ema") == 1 and (host / "final_ema" / "d").exists()
    assert fresh.download("nothing_there") == 0
    # what was downloaded is not uploaded back unless it changes
    assert fresh.upload("base") == 0
    os.utime(host / "metrics.jsonl", ns=(1, 1))
    assert fresh.upload("base") == 1


def test_fetch_copies_a_bucket_folder_once_and_resumes(gcs_bucket, monkeypatch, tmp_path,
                                                       capsys):  # fmt: skip
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "mirror"))
    url = f"{gcs_bucket}/{tmp_path.name}/sdxl-base"
    files = {"model_index.json": "{}", "unet/config.json": "u", "vae/w.safetensors": "v" * 3000}
    for rel, text in files.items():
        (epath.Path(url) / rel).write_text(text)

    monkeypatch.setattr(wl, "PROGRESS_EVERY_S", 0.0)  # the bar redrawn per block
    local = wl.fetch(url)
    assert local == tmp_path / "mirror" / "gs" / url.removeprefix("gs://")
    out, err = capsys.readouterr()
    assert f"fetching {url}" in out and "fetched 3 files" in out
    # tqdm on stderr: bytes done / total, [elapsed<ETA, rate, files done]
    assert re.search(r"3\.00k/3\.00k \[\d\d:\d\d<\d\d:\d\d, [\d.]+[kMG]?B/s, 3/3 files\]", err)
    got = {p.relative_to(local).as_posix(): p.read_text() for p in local.rglob("*") if p.is_file()}
    assert got == files
    # fetched: not again, even when the bucket changes
    (epath.Path(url) / "unet/config.json").write_text("changed")
    assert wl.fetch(url) == local and (local / "unet/config.json").read_text() == "u"

    # interrupted before it finished (no marker, one file missing): only what is missing comes
    (local.parent / f".{local.name}.fetched").unlink()
    (local / "vae/w.safetensors").unlink()
    wl.fetch(url)
    assert (local / "vae/w.safetensors").read_text() == "v" * 3000
    assert (local / "unet/config.json").read_text() == "u"  # present: kept
    assert not list(local.rglob("*.part*"))


def test_fetch_a_single_file_and_a_missing_url(gcs_bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "mirror"))
    url = f"{gcs_bucket}/{tmp_path.name}/sd_xl_base_1.0.safetensors"
    epath.Path(url).write_bytes(b"\x00weights")
    assert wl.fetch(url).read_bytes() == b"\x00weights"
    assert wl.fetch(str(tmp_path / "x")) == tmp_path / "x"  # local: as it is
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wl.fetch(f"{gcs_bucket}/{tmp_path.name}/nothing_here")
    assert not (
        tmp_path / "mirror" / "gs" / gcs_bucket[5:] / tmp_path.name / "nothing_here"
    ).exists()
