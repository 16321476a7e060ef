"""Prompt sets and image folders: the formats practitioners use, deterministic subsets,
unreadable images skipped and counted, errors that name the fix."""

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.data import synthetic
from sdxl_jax.eval import folders, prompts

PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\t\n"
    "a tiger wearing a tuxedo\tAnimals\tImagination\tsome note\n"
    "a red circle in the top left\tIllustrations\tBasic\t\n"
)
DRAWBENCH = 'Prompts,Category\n"A red colored car.",Colors\n"A black apple, and a green book.",Colors\n"Tcennis rpacket.",Misspellings\n'  # noqa: E501


def test_parti_drawbench_and_text_files(tmp_path):
    (tmp_path / "p.tsv").write_text(PARTI)
    s = prompts.load(tmp_path / "p.tsv")
    assert s.kind == "parti" and s.texts[1] == "a tiger wearing a tuxedo"
    assert [p.category for p in s.prompts] == ["Abstract", "Animals", "Illustrations"]
    assert s.prompts[1].challenge == "Imagination"
    (tmp_path / "d.csv").write_text(DRAWBENCH)
    s = prompts.load(tmp_path / "d.csv")
    assert s.kind == "drawbench" and s.texts[1] == "A black apple, and a green book."
    assert [p.category for p in s.prompts] == ["Colors", "Colors", "Misspellings"]
    (tmp_path / "t.txt").write_text("one\n\n two \n")
    assert prompts.load(tmp_path / "t.txt").texts == ["one", "two"]
    (tmp_path / "bad.tsv").write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(prompts.PromptSetError, match="no prompt column .*'Text', 'Category'"):
        prompts.load(tmp_path / "bad.tsv")
    with pytest.raises(prompts.PromptSetError, match="does not exist"):
        prompts.load(tmp_path / "missing.txt")
    with pytest.raises(prompts.PromptSetError, match="not a prepared dataset"):
        prompts.load(tmp_path)


def test_synthetic_set_and_deterministic_subsets():
    s = prompts.load("synthetic")
    n = len(synthetic.COLOURS) * len(synthetic.SHAPES) * len(synthetic.POSITIONS)
    assert len(s) == n and all(synthetic.parse_caption(t) for t in s.texts)
    a, b, c = s.subset(10, seed=3), s.subset(10, seed=3), s.subset(10, seed=4)
    assert a == b and a != c and len(a) == 10
    order = [s.texts.index(t) for t in a.texts]
    assert order == sorted(order)  # kept in the set's order
    with pytest.raises(prompts.PromptSetError, match=f"more than the {n} prompts"):
        s.subset(n + 1)


def test_folder_reading_skips_and_counts_unreadable_images(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "notes.txt").write_text("not an image")
    files = folders.image_files(tmp_path)
    assert [f.name for f in files] == [f"{i}.png" for i in range(5)]
    skipped = folders.Skipped()
    got = list(folders.read_batches(files, 2, skipped))
    assert [keep for keep, _ in got] == [[0, 1], [2, 4]]
    assert got[1][1][1].shape == (24, 30, 3)
    assert skipped.count == 1 and skipped.examples[0].startswith("3.png: truncated")
    # prompts from the manifest sample writes, or a file in name order
    manifest = {"images": [{"file": f.name, "prompt": f"p{i}"} for i, f in enumerate(files)]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert folders.folder_prompts(tmp_path, files, None) == [f"p{i}" for i in range(5)]
    # with a manifest (sample's folders), only the images it lists: not grid.png
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "grid.png")
    assert folders.image_files(tmp_path) == files
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(folders.EvalInputError, match="2 prompts for 5 images"):
        folders.folder_prompts(tmp_path, files, str(tmp_path / "short.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(folders.EvalInputError, match="holds no images"):
        folders.image_files(empty)
