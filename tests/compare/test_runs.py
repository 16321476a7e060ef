"""Matching two runs' images by prompt, seed and image number; what cannot match is listed."""

from __future__ import annotations

import json

import pytest

from sdxl_jax.compare.__main__ import main
from sdxl_jax.compare.runs import StudyError, load_study
from tests.compare.fixtures import PROMPTS, write_run


def test_images_pair_by_prompt_seed_and_image_number(tmp_path):
    a = write_run(tmp_path / "a", "a", num_images=2)
    b = write_run(tmp_path / "b", "b", prompts=list(reversed(PROMPTS)), num_images=2)
    study = load_study({"a": a, "b": b})
    assert len(study.items) == 2 * len(PROMPTS) and not study.left_out
    for item in study.items:
        recs = {n: json.loads((study.runs[n] / "manifest.json").read_text()) for n in "ab"}
        for n in "ab":
            (rec,) = [r for r in recs[n]["images"] if r["file"] == item.files[n].name]
            assert (rec["prompt"], rec["seed"], rec["image_of_prompt"]) == (
                item.prompt, item.seed, item.image_of_prompt)  # fmt: skip
    # the repeated prompt is two items, matched in order of appearance
    repeated = [i for i in study.items if i.prompt == "a red circle" and i.image_of_prompt == 0]
    assert len(repeated) == 2
    assert {i.files["a"].name for i in repeated} == {"00000.png", "00006.png"}
    assert {i.files["b"].name for i in repeated} == {"00000.png", "00006.png"}


def test_images_without_a_match_are_listed_and_left_out(tmp_path):
    a = write_run(tmp_path / "a", "a")
    b = write_run(tmp_path / "b", "b", prompts=PROMPTS[:2] + [("a purple star", None)])
    c = write_run(tmp_path / "c", "c", seed=1)
    study = load_study({"a": a, "b": b})
    assert sorted(i.prompt for i in study.items) == ["a blue square", "a red circle"]
    assert len(study.left_out) == 3  # a's triangle and second circle, b's star
    assert any("a purple star" in line for line in study.left_out)
    with pytest.raises(StudyError, match="no image matches"):
        load_study({"a": a, "c": c})  # other seeds: nothing pairs


def test_folders_that_are_not_runs_are_refused(tmp_path):
    a = write_run(tmp_path / "a", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError, match="no manifest.json"):
        load_study({"a": a, "b": tmp_path / "empty"})
    with pytest.raises(StudyError, match="not a folder"):
        load_study({"a": a, "b": tmp_path / "nowhere"})
    with pytest.raises(StudyError, match="different folders"):
        load_study({"a": a, "b": tmp_path / "a" / "."})
    evil = write_run(tmp_path / "evil", "b")
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["images"][0]["file"] = "../a/00000.png"  # an image outside its folder
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StudyError, match="not a PNG in the folder"):
        load_study({"a": a, "b": evil})
    (evil / "manifest.json").write_text("{not json")
    with pytest.raises(StudyError, match="not a sample manifest"):
        load_study({"a": a, "b": evil})


def test_serve_says_what_is_wrong_in_one_line(tmp_path, capsys):
    a = write_run(tmp_path / "a", "a")
    assert main(["serve", "--a", str(a), "--b", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a folder" in err[0]
    b = write_run(tmp_path / "b", "b")
    (tmp_path / "votes").mkdir()
    argv = ["serve", "--a", str(a), "--b", str(b), "--votes", str(tmp_path / "votes")]
    assert main(argv) == 2
    assert "is a folder" in capsys.readouterr().err
