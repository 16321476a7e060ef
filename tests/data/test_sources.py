"""Source specs and readers: parsing, brace lists, and broken shards."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from sdxl_jax.data import readers
from sdxl_jax.data.readers import RecordError, SourceError, expand_braces
from sdxl_jax.data.sources import open_source, parse_spec, parse_synthetic


def test_parse_spec_options_and_glob_wildcards():
    assert parse_spec("folder:/data/x") == ("folder", "/data/x", {})
    assert parse_spec("csv:/m.csv?image=file&caption=text") == (
        "csv",
        "/m.csv",
        {"image": "file", "caption": "text"},
    )
    # "?" that does not start k=v options is a glob wildcard, part of the location.
    assert parse_spec("webdataset:/d/shard-??.tar") == ("webdataset", "/d/shard-??.tar", {})
    assert parse_spec("webdataset:/d/s-?.tar?caption=alt") == (
        "webdataset",
        "/d/s-?.tar",
        {"caption": "alt"},
    )
    assert parse_spec("tfds:coco_captions/2017:1.1.0?data_dir=/t")[1] == "coco_captions/2017:1.1.0"
    with pytest.raises(SourceError, match="take options"):
        parse_spec("synthetic:10?sed=1")


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_webdataset_broken_shards(tmp_path):
    whole = _tar_bytes({"a.jpg": b"x" * 1000, "a.txt": b"cap a", "b.jpg": b"y" * 5000})
    (tmp_path / "s-0.tar").write_bytes(whole[:3500])  # ends inside b.jpg's data
    (tmp_path / "s-1.tar").write_bytes(b"not a tar at all")
    src = open_source(f"webdataset:{tmp_path}/s-{{0..1}}.tar")
    # a, b (cut short), a marker for whatever the cut lost, the file that is no tar.
    assert [r[0] for r in src.records] == [
        "a",
        "b",
        f"{tmp_path}/s-0.tar:rest",
        f"{tmp_path}/s-1.tar",
    ]
    a = src.load(0)
    assert (a.key, a.data, a.captions) == ("a", b"x" * 1000, ["cap a"])
    reasons = []
    for i in (1, 2, 3):
        with pytest.raises(RecordError) as e:
            src.load(i)
        reasons.append(e.value.reason)
    assert reasons == ["truncated", "truncated", "read_error"]

    (tmp_path / "z.tar").write_bytes(gzip.compress(whole))
    with pytest.raises(SourceError, match="decompress"):
        open_source(f"webdataset:{tmp_path}/z.tar")


def test_sources_pickle_without_open_handles(tmp_path):
    import pickle

    (tmp_path / "s.tar").write_bytes(_tar_bytes({"k.png": b"p", "k.txt": b"c"}))
    src = open_source(f"webdataset:{tmp_path}/s.tar")
    src.load(0)  # opens and caches the shard file
    clone = pickle.loads(pickle.dumps(src))
    assert not any(k.startswith("_cache") for k in vars(clone))
    assert clone.load(0).data == b"p"
    assert isinstance(clone, readers.WebDatasetSource)


def test_parse_synthetic():
    assert parse_synthetic("synthetic:8") == (8, 0)
    assert parse_synthetic("synthetic:8?seed=3") == (8, 3)
    for spec, match in (
        ("synthetic:ten", "synthetic:N"),
        ("synthetic:0", "N > 0"),
        ("synthetic:8?sed=3", "take options"),
        ("folder:/data", "not a synthetic source"),
    ):
        with pytest.raises(SourceError, match=match):
            parse_synthetic(spec)


def test_train_loop_prepares_a_seeded_synthetic_spec(tmp_path):
    import ml_collections

    from sdxl_jax.data import batching, synthetic
    from sdxl_jax.train import loop

    config = ml_collections.ConfigDict({"data": {"path": "synthetic:8?seed=3"}})
    path = loop.resolve_data(config, tmp_path)
    assert path == str(tmp_path / "data" / "synthetic_8_seed3")
    source = batching.open_source(path)
    want = list(synthetic.examples(8, seed=3))
    assert [source[i]["key"].decode() for i in range(len(source))] == [e["key"] for e in want]
    assert [source[i]["image"] for i in range(len(source))] == [e["image"] for e in want]
    assert want[0]["image"] != next(synthetic.examples(1, seed=0))["image"]  # the seed counts
