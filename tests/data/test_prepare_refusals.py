"""``prepare`` refuses what would give an empty or unwritable dataset in one line, before
reading the source, and skips captions that are not UTF-8 with a counted reason."""

from __future__ import annotations

import json
import os

import pytest

from sdxl_jax.data import prepare
from sdxl_jax.data.prepare import REPORT_FILE, main
from tests.data.fixtures import coded_image, png_bytes


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    return err[0]


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    cases = [
        (tmp_path / "taken", "is a file; give a folder"),
        (tmp_path / "taken" / "below", "is a file, not a folder"),
        ("/proc/sdxl_jax_dataset", "cannot write in /proc"),
    ]
    for out, message in cases:
        assert main(["--source", "synthetic:4", "--out", str(out), "--no-progress"]) == 2
        assert message in one_line(capsys), out
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    assert main(["--source", "synthetic:4", "--out", str(tmp_path / "loop"), "--no-progress"]) == 2
    assert "symlink" in one_line(capsys)


def test_max_examples_below_one_is_refused(tmp_path, capsys):
    for n in ("0", "-3"):
        argv = ["--source", "synthetic:4", "--out", str(tmp_path / "o"), "--max-examples", n]
        assert main([*argv, "--no-progress"]) == 2
        assert f"--max-examples {n}: give at least 1" in one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_sources_behind_symlink_loops_and_broken_links_say_so(tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for source, message in [
        (f"folder:{tmp_path / 'loop'}", "is a symlink loop"),
        (f"folder:{tmp_path / 'dangling'}", "is a broken symlink"),
        (f"jsonl:{tmp_path / 'loop'}", "is a symlink loop"),
    ]:
        assert main(["--source", source, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert message in one_line(capsys), source


def test_captions_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, caption in enumerate([b"a red circle", b"a caf\xe9 au lait", "a caf\u00e9".encode()]):
        (root / f"{i}.png").write_bytes(png_bytes(coded_image(16, 16, i)))
        (root / f"{i}.txt").write_bytes(caption)
    report = prepare.prepare(f"folder:{root}", tmp_path / "ds", workers=1, progress=False)
    assert report["skipped"]["caption_not_utf8"] == 1
    assert report["totals"] == {"read": 3, "written": 2, "skipped": 1}
    (example,) = report["skipped_examples"]["caption_not_utf8"]
    assert "1.txt: not UTF-8 at byte 5" in str(example)
    assert json.loads((tmp_path / "ds" / REPORT_FILE).read_text())["totals"]["written"] == 2


@pytest.mark.parametrize("caption", [b"\xff\xfe\x00bad", b"ok then \xc3("])
def test_webdataset_and_manifest_captions_too(caption, tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i, text in enumerate([b"fine", caption]):
            for name, data in [(f"{i}.png", png_bytes(coded_image(16, 16, i))), (f"{i}.txt", text)]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    report = prepare.prepare(f"webdataset:{tmp_path / 'shard.tar'}", tmp_path / "ds", workers=1,
                             progress=False)  # fmt: skip
    assert report["skipped"]["caption_not_utf8"] == 1 and report["totals"]["written"] == 1


def test_a_source_whose_every_record_is_skipped_fails(tmp_path, capsys):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "a.png").write_bytes(b"not an image")
    (root / "a.txt").write_text("a caption")
    assert main(["--source", f"folder:{root}", "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "not_an_image" in captured.out
    assert "no record passed the checks" in captured.err
