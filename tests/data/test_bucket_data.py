"""A prepared dataset read from a bucket (``gs://``, on the local GCS server of tests/gcs.py):
TFDS opens it and ArrayRecord reads its records over the GCS API, in this process and in Grain's
worker processes. The batches, and a latent cache built from it, equal those from the same
dataset on disk."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_jax import workdir as wl
from sdxl_jax.data import batching, cache
from sdxl_jax.data import pipeline as data_pipeline
from sdxl_jax.train import cache_builder
from tests import gcs
from tests.data import fixtures as fx


@pytest.fixture(scope="module")
def on_disk_and_in_bucket(tmp_path_factory, gcs_bucket):
    local, _ = fx.prepared_dataset(tmp_path_factory.mktemp("bucket_data") / "data", n=24)
    remote = gcs.upload(local, f"{gcs_bucket}/datasets/shapes")
    return str(local), str(remote)


def batches(path: str, n: int, **kw) -> list[dict]:
    cfg = data_pipeline.DataConfig(
        path=path, bucket_set="tiny_32", global_batch_size=4, flip=True, **kw
    )
    with data_pipeline.make_iterator(cfg, process_index=0, process_count=1, verbose=False) as it:
        return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_from_the_bucket_equal_those_from_disk(on_disk_and_in_bucket, workers):
    local, remote = on_disk_and_in_bucket
    assert remote.startswith("gs://")
    want, got = batches(local, 5), batches(remote, 5, num_workers=workers)
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_cache_built_from_the_bucket_equals_one_from_disk(on_disk_and_in_bucket, tiny_sdxl,
                                                            monkeypatch, tmp_path):  # fmt: skip
    local, remote = on_disk_and_in_bucket
    base, _ = tiny_sdxl
    meta = cache_builder.build_cache(local, base, tmp_path / "disk", bucket_set="tiny_32",
                                     batch_size=8, dtype="float32", progress=False)  # fmt: skip
    assert meta["data"] == local
    # all in the bucket, through the command line: data read in place, the checkpoint fetched,
    # the cache built on this disk and uploaded; a training host fetches it
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "mirror"))
    ckpt = str(gcs.upload(base, f"{remote}-checkpoint"))
    rc = cache_builder.main(["--data", remote, "--checkpoint", ckpt, "--bucket-set", "tiny_32",
                             "--out", f"{remote}-cache", "--batch-size", "8", "--dtype",
                             "float32"])  # fmt: skip
    assert rc == 0
    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "training_host"))
    out = {"disk": cache.CachedSource(tmp_path / "disk"),
           "bucket": cache.CachedSource(wl.fetch(f"{remote}-cache"))}  # fmt: skip
    assert len(out["disk"]) == len(out["bucket"]) > 0
    for i in range(len(out["disk"])):
        a, b = out["disk"][i], out["bucket"][i]
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} of record {i}")


def test_a_missing_bucket_dataset_names_the_fix(gcs_bucket):
    with pytest.raises(FileNotFoundError, match="is not a prepared dataset.*sdxl_jax.data.prepare"):
        batching.load_index(f"{gcs_bucket}/no/such/dataset")


def test_prepare_into_a_bucket_builds_locally_then_uploads(gcs_bucket, monkeypatch, tmp_path,
                                                          capsys):  # fmt: skip
    from etils import epath

    from sdxl_jax.data import prepare

    monkeypatch.setenv("SDXL_LOCAL_DIR", str(tmp_path / "disk"))
    url = f"{gcs_bucket}/{tmp_path.name}/shapes"
    kw = dict(bucket_sets=("tiny_32",), workers=1, progress=False)
    report = prepare.prepare("synthetic:12", url, **kw)
    remote = epath.Path(url)
    names = sorted(p.name for p in remote.iterdir())
    assert prepare.REPORT_FILE in names and batching.INDEX_FILE in names and ".staging" not in names
    assert len(batching.open_source(url)) == report["totals"]["written"] == 12
    assert "uploaded" in capsys.readouterr().out

    # the upload was cut short (its report goes last): a rerun uploads what is missing
    (remote / prepare.REPORT_FILE).unlink()
    (remote / batching.INDEX_FILE).unlink()
    prepare.prepare("synthetic:12", url, **kw)
    assert "uploading what is missing" in capsys.readouterr().out
    assert (remote / batching.INDEX_FILE).exists() and (remote / prepare.REPORT_FILE).exists()
    assert len(batching.load_index(url)["height"]) == 12

    with pytest.raises(FileExistsError, match="already holds a prepared dataset.*--overwrite"):
        prepare.prepare("synthetic:12", url, **kw)
    prepare.prepare("synthetic:8", url, overwrite=True, **kw)  # replaces it
    assert len(batching.open_source(url)) == 8 and len(batching.load_index(url)["height"]) == 8
