"""The FID InceptionV3 against pytorch-fid's and torch-fidelity's, on random weights.

pytorch-fid's ``fid_inception_v3()`` is built with a random state dict in place of the download
(torchvision's Inception3 with the same constructor arguments has the same keys and shapes), its
BatchNorm affine parameters randomised and its running statistics calibrated on random images
(uncalibrated, random Inception features collapse). That state dict, written to safetensors, is
loaded through ``load_inception``: the tests cover the key names, the OIHW -> HWIO layout and the
running statistics too. ``reference()`` is shared with tests/eval/test_inception.py.
"""

from __future__ import annotations

import hashlib
import os
import re
from unittest import mock

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from flax import nnx
from pytorch_fid import inception as pfid
from safetensors.torch import save_file

from sdxl_jax.models.inception import fid_resize
from sdxl_jax.weights.inception import EXPECTED_NAME, conversion_command, load_inception

KEYS = ("64", "192", "768", "2048", "logits_unbiased", "logits")
_CACHE: dict[str, object] = {}


def reference(tmp_path_factory) -> tuple[torch.nn.Module, pfid.InceptionV3, str]:
    """(the calibrated random fid_inception_v3, pytorch-fid's InceptionV3 wrapper around it with
    all four blocks, the safetensors file of its state dict), built once per session."""
    if not _CACHE:
        torch.manual_seed(0)
        template = torchvision.models.inception_v3(
            num_classes=1008, aux_logits=False, weights=None, init_weights=False
        ).state_dict()
        with mock.patch.object(pfid, "load_state_dict_from_url", lambda *a, **k: template):
            net = pfid.fid_inception_v3()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                    m.reset_running_stats()
                    m.momentum = None  # a cumulative average: one pass sets the batch's stats
            net.train()
            net(torch.rand(6, 3, 299, 299) * 2 - 1)
        net.eval()
        with mock.patch.object(pfid, "fid_inception_v3", lambda: net):
            wrapper = pfid.InceptionV3([0, 1, 2, 3]).eval()
        path = str(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05.safetensors")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        _CACHE.update(net=net, wrapper=wrapper, path=path)
    return _CACHE["net"], _CACHE["wrapper"], _CACHE["path"]


def torch_features(net, wrapper, x: torch.Tensor, *, resize: bool = True) -> dict[str, np.ndarray]:
    """pytorch-fid's four blocks, averaged as its ``get_activations`` does, and the classifier
    without / with its bias (torch-fidelity's ``logits_unbiased`` / ``logits``)."""
    wrapper.resize_input = resize
    with torch.no_grad():
        blocks = [F.adaptive_avg_pool2d(b, (1, 1)).flatten(1) for b in wrapper(x)]
        unbiased = blocks[3] @ net.fc.weight.T
        out = dict(zip(KEYS[:4], blocks, strict=True))
        out |= {"logits_unbiased": unbiased, "logits": unbiased + net.fc.bias}
    return {k: v.double().numpy() for k, v in out.items()}


def assert_close(ours: dict, ref: dict) -> None:
    """Every output within 1e-4 of its largest magnitude, and the features not collapsed."""
    for k in KEYS:
        a, b = np.asarray(ours[k], np.float64), ref[k]
        assert a.shape == b.shape, (k, a.shape, b.shape)
        scale = np.abs(b).max()
        assert np.abs(b - b.mean(0)).max() > 1e-3 * scale, f"{k}: reference features collapsed"
        err = np.abs(a - b).max()
        assert err <= 1e-4 * scale, f"{k}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tmp_path_factory)


@pytest.fixture(scope="module")
def ours(ref):
    """Our loaded model, called compiled: fn(x, resize) -> features."""
    model, info = load_inception(ref[2])
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, x, r: nnx.merge(graphdef, s)(x, resize=r), static_argnums=2)
    return lambda x, resize=True: run(state, x, resize), info


def test_fid_resize_is_torch_bilinear_without_antialiasing():
    rng = np.random.default_rng(0)
    for h, w in [(512, 512), (97, 131), (300, 299), (640, 200)]:
        x = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
        ours = np.asarray(jax.jit(fid_resize)(x))
        ref = F.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            (299, 299),
            mode="bilinear",
            align_corners=False,
        )
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5, err_msg=(h, w))


def test_matches_pytorch_fid_with_resize(ref, ours):
    """Non-square images of another size, resized inside the network (pytorch-fid's default)."""
    net, wrapper, _ = ref
    x = np.random.default_rng(1).uniform(0, 1, (2, 180, 240, 3)).astype(np.float32)
    want = torch_features(net, wrapper, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert_close(ours[0](x), want)


def test_matches_torch_fidelity(ref, ours, tmp_path):
    """torch-fidelity's FeatureExtractorInceptionV3 loads the same state dict (the same layout)
    and, on 299x299 uint8 images (its TF1-style resize is then the identity), computes what our
    network computes on x / 256: it maps uint8 to (x - 128) / 128 = 2 (x / 256) - 1."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net, _, _ = ref
    pth = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), pth)
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", list(KEYS), str(pth))
    x = np.random.default_rng(2).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    with torch.no_grad():
        got = fidelity(torch.from_numpy(x).permute(0, 3, 1, 2))
    want = {k: v.double().numpy() for k, v in zip(KEYS, got, strict=True)}
    assert_close(ours[0](x.astype(np.float32) / 256, resize=False), want)


def test_weights_info(ref, ours, tmp_path):
    path = ref[2]
    with open(path, "rb") as f:
        assert ours[1].sha256 == hashlib.sha256(f.read()).hexdigest()
    assert ours[1].layout == "pytorch-fid"
    other = tmp_path / "weights-inception-2015-12-05.safetensors"
    os.link(path, other)  # the same bytes under torch-fidelity's name
    model, info = load_inception(other)
    assert (info.layout, info.sha256) == ("torch-fidelity", ours[1].sha256)
    np.testing.assert_array_equal(
        model.Mixed_7c.branch_pool.bn.var[...],
        ref[0].Mixed_7c.branch_pool.bn.running_var.numpy(),
    )


def test_conversion_command_converts_what_torch_saved(ref, tmp_path, monkeypatch):
    """The command our errors print, run as printed, on a torch.save'd state dict with a strided
    tensor and BatchNorm's num_batches_tracked: the result loads and holds the same tensors."""
    net = ref[0]
    sd = net.state_dict()
    sd["fc.weight"] = sd["fc.weight"].T.contiguous().T  # the same values, column-major
    assert not sd["fc.weight"].is_contiguous() and "Mixed_5b.branch1x1.bn.num_batches_tracked" in sd
    torch.save(sd, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    command = conversion_command()
    code = re.fullmatch(r'python -c "(.*)"', command).group(1)
    monkeypatch.chdir(tmp_path)
    exec(code, {})  # noqa: S102 (our own command, as a user would run it)
    model, _ = load_inception(tmp_path / "pt_inception-2015-12-05.safetensors")
    np.testing.assert_array_equal(model.fc.kernel[...], net.fc.weight.detach().numpy().T)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refuses_missing_pickle_and_non_safetensors_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "pt_inception-2015-12-05.safetensors")
    assert "pt_inception-2015-12-05.safetensors" in _one_line(e) and conversion_command() in str(
        e.value
    )
    pth = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.bias": torch.zeros(3)}, pth)
    with pytest.raises(ValueError, match="pickle") as e:
        load_inception(pth)
    assert conversion_command(pth.name) in _one_line(e)
    assert "'weights-inception-2015-12-05.safetensors'" in str(e.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 a zip file, as torch.save writes")
    with pytest.raises(ValueError, match="not a readable safetensors") as e:
        load_inception(junk)
    assert conversion_command() in _one_line(e)


def test_mismatched_tensors_name_the_first_key_and_both_shapes(ref, tmp_path):
    sd = {k: v.contiguous() for k, v in ref[0].state_dict().items()}
    cases = {
        "shape": (
            {**sd, "fc.weight": torch.zeros(1000, 2048)},
            r"'fc\.weight' has shape \(1000, 2048\).*expects \(1008, 2048\)",
        ),
        "missing": (
            {k: v for k, v in sd.items() if k != "Mixed_6a.branch3x3.conv.weight"},
            r"no tensor 'Mixed_6a\.branch3x3\.conv\.weight' \(expected shape \(384, 288, 3, 3\)\)",
        ),
        "extra": ({**sd, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, "'AuxLogits.fc.weight'"),
    }
    for name, (tensors, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match=pattern) as e:
            load_inception(path)
        # The fix is named too: the file expected and the one-line conversion.
        assert conversion_command() in _one_line(e) and EXPECTED_NAME in str(e.value)
