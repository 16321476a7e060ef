"""Bucket workdirs: the local mirror, uploads of what changed, downloads to a fresh host. The
"bucket" here is a second local folder reached through etils.epath, as gs:// would be."""

import os
import time

from sdxl_jax import workdir as wl


def test_remote_detection_and_mirror_location(monkeypatch, tmp_path):
    assert wl.is_remote("gs://bucket/run") and not wl.is_remote("/tmp/run")
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path))
    assert wl.local_mirror("gs://bucket/a/run/") == tmp_path / "gs" / "bucket" / "a" / "run"
    local = wl.Workdir(tmp_path / "plain")
    assert not local.remote and local.root == local.local == tmp_path / "plain"
    assert local.upload("x") == 0 and local.download("x") == 0


def test_upload_copies_new_and_changed_files_only(tmp_path):
    wd = wl.Workdir(tmp_path / "bucket", local=tmp_path / "host")
    stage = tmp_path / "host" / "base"
    (stage / "tb").mkdir(parents=True)
    (stage / "metrics.jsonl").write_text("a\n")
    (stage / "tb" / "events").write_bytes(b"\x00\x01")
    assert wd.upload("base") == 2
    assert (tmp_path / "bucket" / "base" / "tb" / "events").read_bytes() == b"\x00\x01"
    assert wd.upload("base") == 0  # nothing changed
    time.sleep(0.01)
    with open(stage / "metrics.jsonl", "a") as f:
        f.write("b\n")
    assert wd.upload("base") == 1
    assert (tmp_path / "bucket" / "base" / "metrics.jsonl").read_text() == "a\nb\n"


def test_a_fresh_host_downloads_all_but_what_is_skipped(tmp_path):
    bucket = tmp_path / "bucket"
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
