"""``python -m sdxl_jax.eval`` on folders of images, against the reference libraries on the same
files and weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from sdxl_jax.eval import __main__ as cli
from tests.eval.fixtures import make_clip_folder
from tests.models.test_clip_vision import features

CAPTIONS = ["a red circle in the top left", "a blue square", "a green triangle", "cyan"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("clip"))


def write_images(folder, n, seed=0, sizes=((48, 64), (40, 40), (64, 36))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        img = 127 + 90 * np.sin(yy / (3 + i))[..., None] * np.cos(xx[..., None] / 4 + np.arange(3))
        img = np.clip(img + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return sorted(folder.glob("*.png"))


def test_clip_score_of_a_folder_is_torchmetrics_definition(clip_folder, tmp_path, capsys):
    folder, model = clip_folder
    files = write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    prompts = [CAPTIONS[i % 4] for i in range(6)]
    # broken.png sorts first: 7 files, 7 prompts; its prompt is the first line
    lines = ["skipped image's prompt"] + prompts
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    rc = cli.main(["clip-score", "--clip", str(folder), "--images", str(tmp_path / "imgs"),
                   "--prompts", str(tmp_path / "p.txt"), "--batch-size", "8",
                   "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr()
    got = float(out.out.strip().removeprefix("clip_score: "))
    # the reference: CLIPProcessor + CLIPModel on the same files, torchmetrics' definition
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    proc = transformers.CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        img = features(model.get_image_features(pixel_values=px))
        t = proc(text=prompts, return_tensors="pt", padding=True)
        txt = features(model.get_text_features(**t))
    img = img / img.norm(p=2, dim=-1, keepdim=True)
    txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
    want = max(float((100 * (img * txt).sum(-1)).mean()), 0.0)
    assert got == pytest.approx(want, abs=1e-3)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["skipped"]["count"] == 1 and report["clip_images"] == 6
    assert report["clip_score"] == pytest.approx(want, abs=1e-3)
    assert "skipped 1 unreadable images" in out.err


def test_cli_errors_name_the_fix(clip_folder, tmp_path, capsys):
    folder, _ = clip_folder
    (tmp_path / "empty").mkdir()
    assert cli.main(["clip-score", "--clip", str(folder), "--images", str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err
    write_images(tmp_path / "imgs", 2)
    assert cli.main(["clip-score", "--clip", str(folder), "--images", str(tmp_path / "imgs")]) == 2
    assert "has no manifest.json: pass --prompts FILE" in capsys.readouterr().err
    assert (
        cli.main(["clip-score", "--clip", str(tmp_path), "--images", str(tmp_path / "imgs")]) == 2
    )
    assert "not a CLIPModel folder (no config.json)" in capsys.readouterr().err
    rc = cli.main(["is", "--inception", str(tmp_path / "missing.safetensors"),
                   "--images", str(tmp_path / "imgs")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.safetensors does not exist" in err and "torch.load(" in err


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from tests.models.test_inception import reference

    return reference(tmp_path_factory)


@pytest.mark.slow(seconds=50)
def test_fid_and_stats_equal_pytorch_fid_on_the_same_files(inception, tmp_path, capsys):
    """pytorch-fid's own statistics code (ImagePathDataset, get_activations) with the same
    random calibrated network, against `fid` on the folders; `stats` then `--ref stats.npz`
    gives the same value; a cached reference is reused; stats of another mode are refused."""
    from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance

    net, wrapper, weights = inception
    # one size per folder: pytorch-fid stacks each batch
    gen = write_images(tmp_path / "gen", 24, seed=1, sizes=((48, 64),))
    ref = write_images(tmp_path / "ref", 24, seed=2, sizes=((64, 64),))
    wrapper.resize_input = True
    stats = [calculate_activation_statistics(files, wrapper, batch_size=16, dims=64,
                                             num_workers=0) for files in (gen, ref)]  # fmt: skip
    want = calculate_frechet_distance(*stats[0], *stats[1])
    common = ["--inception", weights, "--images", str(tmp_path / "gen"), "--dims", "64",
              "--batch-size", "16", "--stats-cache", str(tmp_path / "cache")]  # fmt: skip
    assert (
        cli.main(
            ["fid", *common, "--ref", str(tmp_path / "ref"), "--json", str(tmp_path / "a.json")]
        )
        == 0
    )  # noqa: E501
    got = float(capsys.readouterr().out.strip().removeprefix("fid: "))
    assert got == pytest.approx(want, rel=1e-3)
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["fid_reference_images"] == 24 and first["inception_images"] == 24
    assert any("FID from 24 generated images with 64-d features" in w for w in first["warnings"])
    # the reference statistics were cached; a second run reads them
    assert (
        cli.main(
            ["fid", *common, "--ref", str(tmp_path / "ref"), "--json", str(tmp_path / "b.json")]
        )
        == 0
    )  # noqa: E501
    second = json.loads((tmp_path / "b.json").read_text())
    assert (
        second["reference_cache"] == first["reference_cache"] and "reference_skipped" not in second
    )
    assert second["fid"] == first["fid"]
    # stats of the reference folder, then FID against the .npz
    out = tmp_path / "ref_stats.npz"
    args = [
        "--inception",
        weights,
        "--images",
        str(tmp_path / "ref"),
        "--dims",
        "64",
        "--out",
        str(out),
    ]  # noqa: E501
    assert cli.main(["stats", *args]) == 0
    assert cli.main(["fid", *common, "--ref", str(out)]) == 0
    assert float(capsys.readouterr().out.strip().split("fid: ")[-1]) == pytest.approx(got, rel=1e-9)
    assert cli.main(["fid", *common, "--ref", str(out), "--mode", "clean"]) == 2
    assert "mode: 'pytorch-fid' there, 'clean' here" in capsys.readouterr().err


def test_inception_score_equals_torch_fidelity_on_the_same_logits(inception, tmp_path, capsys):
    from torch_fidelity.metric_isc import isc_features_to_metric

    from tests.models.test_inception import torch_features

    net, wrapper, weights = inception
    files = write_images(tmp_path / "imgs", 10, seed=3)
    x = torch.from_numpy(
        np.stack([np.asarray(Image.open(f).resize((299, 299), Image.BILINEAR)) for f in files])
    )  # the same size for torch; ours resizes each image itself, so compare on 299^2 files
    for f, img in zip(files, x.numpy(), strict=True):
        Image.fromarray(img).save(f)
    logits = torch_features(net, wrapper, x.permute(0, 3, 1, 2).float() / 255)["logits_unbiased"]
    want = isc_features_to_metric(torch.from_numpy(logits), splits=5)
    args = ["is", "--inception", weights, "--images", str(tmp_path / "imgs"), "--splits", "5"]
    assert cli.main(args) == 0
    mean, std = capsys.readouterr().out.strip().removeprefix("is: ").split(" +- ")
    assert float(mean) == pytest.approx(want["inception_score_mean"], rel=1e-4)
    assert float(std) == pytest.approx(want["inception_score_std"], rel=1e-2, abs=1e-4)
