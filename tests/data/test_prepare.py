"""prepare: every source kind builds a TFDS dataset that reads back aligned with its side index;
broken records are skipped with the right reasons; builds resume after an interruption.

The expectations are written out by hand from the corpus each test makes (which file is broken
how, which key comes first), not taken from an earlier run.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import buckets, images, prepare, synthetic
from sdxl_jax.data import staging as staging_lib
from sdxl_jax.data.prepare import INDEX_FILE, REPORT_FILE, main

FAST = {"workers": 0, "progress": False}


def _image(h: int, w: int, fmt: str = "JPEG", seed: int = 0, exif_orientation: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)), 4, 0), 4, 1)
    im = Image.fromarray(pixels[:h, :w].astype(np.uint8))
    buffer = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _read(out: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Every record (raw image bytes, decoded text) and the side index, checked to align."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    records = []
    for i in range(len(source)):
        r = source[i]
        records.append(
            {
                "image": r["image"],
                "caption": r["caption"].decode(),
                "captions": [c.decode() for c in r["captions"]],
                "height": int(r["height"]),
                "width": int(r["width"]),
                "key": r["key"].decode(),
            }
        )
    with np.load(out / INDEX_FILE) as f:
        index = {k: f[k] for k in f.files}
    assert index["key"].tolist() == [r["key"] for r in records]
    assert index["height"].tolist() == [r["height"] for r in records]
    assert index["width"].tolist() == [r["width"] for r in records]
    for r in records:  # the stored size is the decoded (EXIF-oriented) size
        assert images.decode_rgb(r["image"]).shape == (r["height"], r["width"], 3)
    return records, index


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


# ---------------------------------------------------------------------------------------------
# folder + the broken corpus
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Good images with captions, and one record broken in each way prepare must survive."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    good = {
        "a.jpg": _image(32, 48, seed=1),
        "b.png": _image(40, 40, "PNG", seed=2),
        "rotated.jpg": _image(20, 40, seed=3, exif_orientation=6),  # stored 20x40, shown 40x20
        "sub/c.gif": _image(24, 36, "GIF", seed=4),  # converted to PNG
        "sub/d.jpg": _image(1024, 1024, seed=5),  # as large as its bucket: not small
    }
    jpeg = _image(64, 64, seed=6)
    bad = {
        "empty.jpg": b"",
        "random.png": np.random.default_rng(7).integers(1, 200, 300, np.uint8).tobytes(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"just some text, not an image\n",
        "no_caption.jpg": _image(16, 16, seed=8),
        "blank_caption.jpg": _image(16, 16, seed=9),
        "tall.png": _image(20, 1, "PNG", seed=10),  # h/w = 20 > 4, beyond every SDXL bucket
    }
    for name, data in {**good, **bad}.items():
        (root / name).write_bytes(data)
        if name != "no_caption.jpg":
            caption = "  \n" if name == "blank_caption.jpg" else f"a photo of {name}\n"
            (root / name).with_suffix(".txt").write_text(caption)
    (root / "notes.txt").write_text("a caption file with no image is not a record")
    return root


def test_folder_skips_broken_records_with_reasons(corpus, tmp_path):
    report = prepare.prepare(f"folder:{corpus}", tmp_path / "ds", workers=2, progress=False)
    records, index = _read(tmp_path / "ds")

    # Sorted by relative path, folders after the files beside them (os.walk order).
    keys = ["a.jpg", "b.png", "rotated.jpg", "sub/c.gif", "sub/d.jpg"]
    assert [r["key"] for r in records] == keys
    assert _nonzero(report["skipped"]) == {
        "empty_file": 1,
        "not_an_image": 2,  # random bytes, a text file named .jpg
        "truncated": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "aspect_out_of_range": 1,
    }
    assert report["totals"] == {"read": 12, "written": 5, "skipped": 7}
    assert report["skipped_examples"]["truncated"][0]["key"] == "truncated.jpg"
    assert report["counted"]["converted_to_png"] == 1
    assert report["counted"]["small_image"] == 4  # all but d.jpg are below their 1024^2 bucket

    by_key = {r["key"]: r for r in records}
    assert (by_key["rotated.jpg"]["height"], by_key["rotated.jpg"]["width"]) == (40, 20)
    for key in ("a.jpg", "b.png", "rotated.jpg", "sub/d.jpg"):  # stored byte for byte
        assert by_key[key]["image"] == (corpus / key).read_bytes()
    gif = by_key["sub/c.gif"]["image"]
    assert gif.startswith(b"\x89PNG")
    np.testing.assert_array_equal(
        images.decode_rgb(gif), images.decode_rgb((corpus / "sub/c.gif").read_bytes())
    )
    assert by_key["a.jpg"]["caption"] == "a photo of a.jpg"  # stripped
    assert by_key["a.jpg"]["captions"] == ["a photo of a.jpg"]

    sdxl = buckets.bucket_set("sdxl_1024")
    expected = [sdxl.nearest(r["height"], r["width"]) for r in records]
    assert index["bucket_sdxl_1024"].tolist() == expected
    assert index["bucket_square_256"].tolist() == [0] * 5  # single-size sets take everything
    assert sum(report["bucket_histograms"]["sdxl_1024"]["counts"]) == 5
    assert not (tmp_path / "ds" / ".staging").exists()
    assert json.loads((tmp_path / "ds" / REPORT_FILE).read_text())["totals"]["written"] == 5


def test_folder_keep_empty_captions_and_crop_extreme_aspects(corpus, tmp_path):
    sets = ("sdxl_1024", "tiny_32")
    spec, out = f"folder:{corpus}", tmp_path / "ds"
    report = prepare.prepare(
        spec, out, on_empty_caption="keep", on_aspect="crop", bucket_sets=sets, **FAST
    )
    records, index = _read(out)
    by_key = {r["key"]: (r, i) for i, r in enumerate(records)}
    assert _nonzero(report["skipped"]) == {"empty_file": 1, "not_an_image": 2, "truncated": 1}
    assert report["counted"]["caption_kept_empty"] == 2
    assert report["counted"]["aspect_cropped"] == 1
    missing = by_key["no_caption.jpg"][0]
    assert (missing["caption"], missing["captions"]) == ("", [])
    tall = by_key["tall.png"][1]
    # h/w = 20: the tallest bucket of each set (the paper's 2048x512; tiny_32's 64x16).
    assert buckets.bucket_set("sdxl_1024").sizes[index["bucket_sdxl_1024"][tall]] == (2048, 512)
    assert buckets.bucket_set("tiny_32").sizes[index["bucket_tiny_32"][tall]] == (64, 16)
    columns = ["bucket_sdxl_1024", "bucket_tiny_32", "height", "key", "loss_weight", "repeats"]
    assert sorted(index) == columns + ["source_index", "width"]
    assert set(index["repeats"]) == {1} and set(index["loss_weight"]) == {1.0}


# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------


def test_jsonl_csv_parquet_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    for n in range(3):
        (tmp_path / "img" / f"{n}.jpg").write_bytes(_image(24, 32, seed=n))
    absolute = str(tmp_path / "img" / "2.jpg")
    lines = [
        json.dumps({"image": "img/0.jpg", "caption": "zero"}),
        "{not json",
        json.dumps({"image": absolute, "caption": "two"}),
        json.dumps({"image": "img/0.jpg", "caption": "zero again"}),  # same key: skipped
        json.dumps({"image": "img/missing.jpg", "caption": "gone"}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare.prepare(f"jsonl:{tmp_path / 'm.jsonl'}", tmp_path / "j", **FAST)
    records, _ = _read(tmp_path / "j")
    assert [(r["key"], r["caption"]) for r in records] == [("img/0.jpg", "zero"), (absolute, "two")]
    assert _nonzero(report["skipped"]) == {"read_error": 1, "duplicate_key": 1, "missing_image": 1}

    # csv with other column names, named in the spec; paths relative to root=.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.csv").write_text('file,prompt\nimg/1.jpg,"one, with a comma"\n')
    spec = f"csv:{tmp_path / 'sub' / 'm.csv'}?image=file&caption=prompt&root={tmp_path}"
    prepare.prepare(spec, tmp_path / "c", **FAST)
    assert [(r["key"], r["caption"]) for r in _read(tmp_path / "c")[0]] == [
        ("img/1.jpg", "one, with a comma")
    ]

    # Hugging Face style parquet: image bytes inline, several captions per row, default names.
    inline = [_image(16, 24, "PNG", seed=10 + n) for n in range(3)]
    table = pa.table(
        {
            "image": [{"bytes": b, "path": f"p{n}.png"} for n, b in enumerate(inline)],
            "text": [["first", "second"], ["only"], []],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=2)
    report = prepare.prepare(f"parquet:{tmp_path / 'm.parquet'}", tmp_path / "p", **FAST)
    records, _ = _read(tmp_path / "p")
    assert [(r["key"], r["caption"], r["captions"]) for r in records] == [
        ("p0.png", "first", ["first", "second"]),
        ("p1.png", "only", ["only"]),
    ]
    assert [r["image"] for r in records] == inline[:2]
    assert _nonzero(report["skipped"]) == {"missing_caption": 1}
    assert report["counted"]["multiple_captions"] == 1


# ---------------------------------------------------------------------------------------------
# webdataset, tfds, synthetic
# ---------------------------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_brace_list(tmp_path):
    jpg, png = _image(24, 24, seed=1), _image(24, 32, "PNG", seed=2)
    _tar(tmp_path / "shard-000.tar", {"x/a.jpg": jpg, "x/a.txt": b"caption a"})
    _tar(
        tmp_path / "shard-001.tar",
        {
            "b.png": png,
            "b.json": json.dumps({"caption": "caption b"}).encode(),
            "c.json": b'{"text": "no image"}',
            "d.jpg": jpg,
            "d.json": json.dumps({"text": ["caption d", "another d"]}).encode(),
        },
    )
    report = prepare.prepare(
        f"webdataset:{tmp_path}/shard-{{000..001}}.tar", tmp_path / "w", **FAST
    )
    records, _ = _read(tmp_path / "w")
    assert [(r["key"], r["caption"]) for r in records] == [
        ("x/a", "caption a"),
        ("b", "caption b"),
        ("d", "caption d"),
    ]
    assert [r["image"] for r in records] == [jpg, png, jpg]
    assert records[2]["captions"] == ["caption d", "another d"]
    assert _nonzero(report["skipped"]) == {"missing_image": 1}


def test_tfds_source_reads_a_local_dataset(tmp_path):
    import tensorflow_datasets as tfds

    pictures = [_image(20, 30, seed=n) for n in range(3)]

    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # A builder from a package module makes TFDS look for checksums beside its code, which
        # needs the (absent) importlib_resources; a __main__ builder skips that.
        __module__ = "__main__"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            captions = tfds.features.Sequence({"text": tfds.features.Text()})
            features = {"image": tfds.features.Image(), "captions": captions, "id": np.int64}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for n, data in enumerate(pictures):
                texts = [{"text": f"picture {n} caption {k}"} for k in range(2)]
                yield n, {"image": data, "captions": texts, "id": 100 + n}

    TinyCaptions(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
    spec = f"tfds:tiny_captions?data_dir={tmp_path / 'tfds'}&caption=captions/text&key=id"
    prepare.prepare(spec, tmp_path / "t", **FAST)
    records, _ = _read(tmp_path / "t")
    assert sorted(r["key"] for r in records) == ["100", "101", "102"]
    for r in records:
        n = int(r["key"]) - 100
        assert r["image"] == pictures[n]
        assert r["captions"] == [f"picture {n} caption 0", f"picture {n} caption 1"]
        assert r["caption"] == r["captions"][0]

    dataset_dir = tmp_path / "tfds" / "tiny_captions" / "1.0.0"  # the folder form; default key
    prepare.prepare(f"tfds:{dataset_dir}?caption=captions/text", tmp_path / "t2", **FAST)
    assert [r["key"] for r in _read(tmp_path / "t2")[0]] == ["train/0", "train/1", "train/2"]


def test_synthetic_matches_the_generator(tmp_path):
    report = prepare.prepare("synthetic:30?seed=3", tmp_path / "s", bucket_sets=["tiny_32"], **FAST)
    records, index = _read(tmp_path / "s")
    expected = list(synthetic.examples(30, seed=3))
    assert [r["key"] for r in records] == [e["key"] for e in expected]
    assert [r["caption"] for r in records] == [e["caption"] for e in expected]
    assert [r["image"] for r in records] == [e["image"] for e in expected]
    assert [(r["height"], r["width"]) for r in records] == [
        (e["height"], e["width"]) for e in expected
    ]
    assert (index["bucket_tiny_32"] >= 0).all() and report["totals"]["skipped"] == 0

    report = prepare.prepare("synthetic:30?seed=3", tmp_path / "s3", max_examples=3, **FAST)
    assert [r["key"] for r in _read(tmp_path / "s3")[0]] == [e["key"] for e in expected[:3]]
    assert report["totals"] == {"read": 3, "written": 3, "skipped": 0}


# ---------------------------------------------------------------------------------------------
# resuming, tokens, CLI
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_interrupted_build_resumes_to_the_same_dataset(corpus, tmp_path, monkeypatch):
    spec, opts = f"folder:{corpus}", {"chunk_size": 3, **FAST}
    prepare.prepare(spec, tmp_path / "whole", **opts)

    write_chunk, calls = staging_lib.write_chunk, []

    def stop_after_two(staging, c, entries):
        if len(calls) == 2:
            raise _Stop
        calls.append(c)
        write_chunk(staging, c, entries)

    monkeypatch.setattr(staging_lib, "write_chunk", stop_after_two)
    with pytest.raises(_Stop):
        prepare.prepare(spec, tmp_path / "part", **opts)
    staged = sorted(p.name for p in (tmp_path / "part" / ".staging").glob("chunk_*"))
    assert staged == ["chunk_0000000.pkl", "chunk_0000001.pkl"]
    assert not (tmp_path / "part" / REPORT_FILE).exists()

    with pytest.raises(FileExistsError, match="other settings"):  # staged with chunk_size 3
        prepare.prepare(spec, tmp_path / "part", workers=0, progress=False)
    monkeypatch.setattr(staging_lib, "write_chunk", write_chunk)
    report = prepare.prepare(spec, tmp_path / "part", **opts)
    assert report["chunks"] == {"total": 4, "staged_by_an_earlier_run": 2}
    whole, part = _read(tmp_path / "whole")[0], _read(tmp_path / "part")[0]
    assert part == whole
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.prepare(spec, tmp_path / "part", **opts)


def test_interrupted_final_write_reruns_and_notices_changed_files(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for n in range(4):
        (src / f"{n}.png").write_bytes(_image(16, 16, "PNG", seed=n))
        (src / f"{n}.txt").write_text(f"caption {n}")
    write_metadata = prepare._write_metadata

    def crash(*args):
        raise _Stop

    monkeypatch.setattr(prepare, "_write_metadata", crash)
    with pytest.raises(_Stop):  # all chunks staged, shards half written
        prepare.prepare(f"folder:{src}", tmp_path / "ds", chunk_size=2, **FAST)
    (src / "2.png").write_bytes(_image(16, 16, "PNG", seed=99))  # edited after its check
    monkeypatch.setattr(prepare, "_write_metadata", write_metadata)
    report = prepare.prepare(f"folder:{src}", tmp_path / "ds", chunk_size=2, **FAST)
    assert report["chunks"]["staged_by_an_earlier_run"] == 2
    assert _nonzero(report["skipped"]) == {"changed_during_build": 1}
    assert [r["key"] for r in _read(tmp_path / "ds")[0]] == ["0.png", "1.png", "3.png"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")) == []


def _char_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with no merges: one token per non-space ASCII character (+ BOS, EOS)."""
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def test_caption_tokens_exact_with_a_tokenizer_else_estimated(tmp_path):
    captions = {"75": "a" * 75, "76": "b" * 76, "words": " ".join(["w"] * 80)}
    for name, caption in captions.items():
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{name}.png").write_bytes(_image(16, 16, "PNG"))
        (tmp_path / "src" / f"{name}.txt").write_text(caption)
    _char_tokenizer(tmp_path / "tok")
    # Exact: 75 + 2 = 77 fits, 76 + 2 and 80 + 2 do not.
    spec = f"folder:{tmp_path / 'src'}"
    exact = prepare.prepare(spec, tmp_path / "e", tokenizer=tmp_path / "tok", **FAST)
    assert exact["counted"]["caption_over_77_tokens"] == 2
    assert exact["caption_tokens"]["method"] == "exact"
    # Estimated: a run of letters is one piece (a lower bound), so only the 80 words count.
    guess = prepare.prepare(spec, tmp_path / "g", **FAST)
    assert guess["counted"]["caption_over_77_tokens"] == 1
    assert guess["caption_tokens"]["method"] == "estimated"


@pytest.mark.parametrize(
    "source, message",
    [
        ("bogus:/x", "unknown source kind 'bogus'"),
        ("folder:", "names no location"),
        ("no-colon", "must be KIND:LOCATION"),
        ("synthetic:ten", "synthetic:N"),
        ("folder:/does/not/exist", "does not exist"),
        ("jsonl:/x.jsonl?colour=red", "options"),
    ],
)
def test_bad_sources_give_one_line_errors(source, message, tmp_path, capsys):
    assert main(["--source", source, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_help_and_missing_arguments(tmp_path):
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "sdxl_jax.data.prepare", *a], capture_output=True, text=True
    )
    shown = run("--help")
    assert shown.returncode == 0
    for kind in ("folder:", "jsonl:", "csv:", "parquet:", "webdataset:", "tfds:", "synthetic:"):
        assert kind in shown.stdout
    missing = run("--out", str(tmp_path))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "--source" in missing.stderr
