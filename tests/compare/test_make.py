"""``compare make`` on tiny random SDXL pipelines: the sides share prompts, seeds and noise,
carry PartiPrompts' categories, resume, and are refused early when they could not pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.compare.__main__ import main
from sdxl_jax.compare.runs import load_study
from sdxl_jax.inference.generate import generate

PARTI = "Prompt\tCategory\tChallenge\tNote\n" + "".join(
    f"{p}\t{c}\tBasic\t\n"
    for p, c in [
        ("a red circle", "Abstract"),
        ("a blue square", "Abstract"),
        ("a green triangle on grass", "Outdoor Scenes"),
    ]  # fmt: skip
)
SETTINGS = "--steps 2 --height 32 --width 32 --seed 5 --sampler euler --guidance 4"


@pytest.mark.slow(seconds=60)
def test_make_two_sides_then_serve_them(tiny_sdxl, tmp_path, capsys):
    base, refiner = tiny_sdxl
    prompts = tmp_path / "parti.tsv"
    prompts.write_text(PARTI)
    side_a = f"--checkpoint {base} {SETTINGS}"
    side_b = f"--checkpoint {base} --refiner {refiner} {SETTINGS}"
    argv = ["make", "--prompts", str(prompts), "--out", str(tmp_path / "study"),
            "--a", side_a, "--b", side_b]  # fmt: skip
    assert main(argv) == 0
    study = load_study({"a": tmp_path / "study/a", "b": tmp_path / "study/b"})
    assert len(study.items) == 3 and not study.left_out
    assert {i.category for i in study.items} == {"Abstract", "Outdoor Scenes"}
    # Side a is what the library makes of those prompts with the same settings.
    want = generate(
        ["a red circle", "a blue square", "a green triangle on grass"], base, steps=2, height=32,
        width=32, seed=5, sampler="euler", guidance=4.0,
    ).images  # fmt: skip
    for item, img in zip(sorted(study.items, key=lambda i: str(i.files["a"])), want, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(item.files["a"])), img)
    manifest = json.loads((tmp_path / "study/b/manifest.json").read_text())
    assert all(r["refiner"] == str(refiner) for r in manifest["images"])

    # A rerun keeps what is made; other settings into the same folder are refused.
    stamp = (tmp_path / "study/a/00000.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "already made" in capsys.readouterr().err
    assert (tmp_path / "study/a/00000.png").stat().st_mtime_ns == stamp
    argv[-1] = f"--checkpoint {base} {SETTINGS}"
    assert main(argv) == 2
    assert "made with other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("side_b", "message"),
    [
        ("--checkpoint {base} --seed 6", "--b has --seed 6 but --a 0: the sides must share"),
        ("--checkpoint {base} --num-images 2", "--num-images 2 but --a 1"),
        ("--checkpoint {base} --out elsewhere", "leave out --out"),
        ("--checkpoint {base} --prompt=hello", "leave out --prompt"),
        ("--checkpoint {base} --eval clip", "leave out --eval"),
        ("--checkpoint {base} --steps", "not valid python -m sdxl_jax.sample options"),
        ("--checkpoint {base} '--steps", "No closing quotation"),
        ("--checkpoint {base} --height 33", "multiple of 8"),
        ("--checkpoint {base}/nowhere", "nowhere"),
    ],
)
def test_sides_that_cannot_pair_are_refused_before_loading(tiny_sdxl, tmp_path, capsys, side_b,
                                                            message):  # fmt: skip
    base, _ = tiny_sdxl
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    rc = main(["make", "--prompts", str(prompts), "--out", str(tmp_path / "study"),
               "--a", f"--checkpoint {base}", "--b", side_b.format(base=base)])  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "study" / "a").exists()  # nothing was generated
