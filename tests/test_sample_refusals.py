"""``python -m sdxl_jax.sample`` refuses input that could only give void images, in one line,
before any weights load; and an image that comes out non-finite is reported, not written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from sdxl_jax import sample
from sdxl_jax.inference import runtime
from sdxl_jax.inference.generate import NonFiniteError, generate

H = W = 32


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(runtime, "load_stage", refuse)
    monkeypatch.setattr(runtime, "load_vae", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def run(base, tmp_path, *args) -> int:
    return sample.main(["--checkpoint", str(base), "--prompt", "x", "--height", str(H),
                        "--width", str(W), "--steps", "2", *map(str, args)])  # fmt: skip


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_noise_is_refused(value, tiny_sdxl, tmp_path, capsys, no_loading):
    noise = np.zeros((1, 4, H // 8, W // 8), np.float32)
    noise[0, 1, 2, 3] = value
    np.save(tmp_path / "noise.npy", noise)
    rc = run(tiny_sdxl[0], tmp_path, "--noise", tmp_path / "noise.npy", "--out", tmp_path / "o")
    assert rc == 2
    assert "holds 1 NaN or inf values" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_noise_files_that_are_not_float_arrays(tiny_sdxl, tmp_path, capsys, no_loading):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "ints.npy", np.zeros((1, 4, 4, 4), np.int32))
    (tmp_path / "text.npy").write_text("not numpy")
    np.savez(tmp_path / "arch.npz", x=np.zeros(3))
    for name, message in [("objects.npy", "is an object array"), ("ints.npy", "holds int32"),
                          ("text.npy", "not a .npy array"), ("arch.npz", "not floats"),
                          ("missing.npy", "does not exist")]:  # fmt: skip
        rc = run(tiny_sdxl[0], tmp_path, "--noise", tmp_path / name, "--out", tmp_path / "o")
        assert rc == 2, name
        assert message in one_line_error(capsys), name


def test_non_finite_init_image_is_refused(tiny_sdxl, tmp_path, capsys, no_loading):
    pixels = np.full((H, W), 0.5, np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "nan.tif")
    rc = run(tiny_sdxl[0], tmp_path, "--init-image", tmp_path / "nan.tif", "--out", tmp_path / "o")
    assert rc == 2
    assert "holds NaN or inf pixels" in one_line_error(capsys)


def test_out_that_is_a_file_and_prompts_that_are_not_utf8(tiny_sdxl, tmp_path, capsys,
                                                           no_loading):  # fmt: skip
    (tmp_path / "taken").write_text("a file")
    assert run(tiny_sdxl[0], tmp_path, "--out", tmp_path / "taken") == 2
    assert "--out" in (line := one_line_error(capsys)) and "is a file" in line
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\na caf\xe9 in the corner\n")
    rc = sample.main(["--checkpoint", str(tiny_sdxl[0]), "--prompts-file",
                      str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    line = one_line_error(capsys)
    assert "prompts.txt is not UTF-8 text (byte 18, line 2)" in line


@pytest.fixture(scope="module")
def poisoned_base(tiny_sdxl, tmp_path_factory):
    """The tiny base with an inf in its UNet's output convolution: every latent goes NaN."""
    folder = tmp_path_factory.mktemp("poisoned") / "base"
    shutil.copytree(tiny_sdxl[0], folder)
    (path,) = (folder / "unet").glob("*.safetensors")
    weights = load_file(path)
    weights["conv_out.bias"] = weights["conv_out.bias"].copy()
    weights["conv_out.bias"][0] = np.inf
    save_file(weights, path)
    return folder


@pytest.mark.slow(seconds=30)
def test_non_finite_samples_are_reported_and_not_written(poisoned_base, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(poisoned_base, tmp_path, "--num-images", 2, "--out", out) == 1
    err = capsys.readouterr().err
    assert "2 image(s) came out non-finite" in err and "--dtype fp32" in err
    assert not list(out.glob("0*.png"))  # no black images
    assert json.loads((out / "manifest.json").read_text())["nonfinite"] == [0, 1]
    with pytest.raises(NonFiniteError):
        generate(["x"], poisoned_base, steps=2, height=H, width=W)
