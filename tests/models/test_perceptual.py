"""LPIPS-VGG16 against torchvision's VGG16 and the paper's formula written here in PyTorch.

One random torchvision ``vgg16(weights=None)`` (no download) plus random non-negative heads are
written to a .safetensors file and loaded through ``load_perceptual``, so the tests also cover
the key names and the OIHW -> HWIO layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from sdxl_jax.weights.perceptual import expected_keys, load_perceptual

WIDTHS = (64, 128, 256, 512, 512)
# torchvision features index after which each LPIPS layer is read (relu1_2 ... relu5_3).
TAPS = (3, 8, 15, 22, 29)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(torch VGG16 features, torch head weights [C] each, path of the safetensors file)."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).features.eval()
    heads = [torch.rand(c) for c in WIDTHS]
    sd = {f"features.{k}": v for k, v in vgg.state_dict().items()}
    sd |= {f"lin{k}.model.1.weight": w.reshape(1, -1, 1, 1) for k, w in enumerate(heads)}
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return vgg, heads, path


@pytest.fixture(scope="module")
def model(weights):
    return load_perceptual(weights[2])


def images(seed: int, shape=(2, 40, 48, 3)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def torch_lpips(vgg, heads, x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """Zhang et al. 2018, eq. 1, as the lpips package computes it (ScalingLayer, VGG16 relu
    taps, unit-normalised channels, squared difference, 1x1 heads, spatial mean, sum)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        y, out = (torch.from_numpy(x).permute(0, 3, 1, 2) - shift) / scale, []
        for i, layer in enumerate(vgg):
            y = layer(y)
            if i in TAPS:
                out.append(y)
            if i == TAPS[-1]:
                break
        return out

    with torch.no_grad():
        total = 0
        for f0, f1, w in zip(taps(x0), taps(x1), heads, strict=True):
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = (n0 - n1).pow(2)
            total = total + (d * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total.numpy()


def test_vgg_features_match_torchvision(weights, model):
    vgg, _, _ = weights
    x = images(0)
    ours = model.vgg_features(jnp.asarray(x))
    y = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = []
        for i, layer in enumerate(vgg):
            y = layer(y)
            if i in TAPS:
                ref.append(y.permute(0, 2, 3, 1).numpy())
    assert [o.shape for o in ours] == [r.shape for r in ref]  # odd sides floor in the pools
    for o, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(o), r, atol=1e-4 * max(1.0, np.abs(r).max()))


def test_lpips_matches_reference_formula(weights, model):
    vgg, heads, _ = weights
    x0, x1 = images(1), images(2)
    x1[1] = x0[1] + 0.05 * images(3)[1]  # a near pair beside a far one
    ours = np.asarray(model(jnp.asarray(x0), jnp.asarray(x1)))
    ref = torch_lpips(vgg, heads, x0, x1)
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert ref[1] < ref[0]


def test_lpips_of_identical_images_is_zero_and_its_gradient_finite(model):
    x = jnp.asarray(images(4, (1, 32, 32, 3)))
    assert abs(float(model(x, x)[0])) < 1e-12
    x = x.at[:, :16].set(-1.0)  # flat black: dead ReLU pixels, all-zero feature vectors
    grad = jax.grad(lambda r: model(x, r).sum())(x + 0.01)
    assert np.isfinite(np.asarray(grad)).all()


def test_load_errors_name_the_problem(tmp_path, weights):
    vgg, heads, path = weights
    from sdxl_jax.weights.safetensors_io import TensorSource

    source = TensorSource.open(path)
    full = {k: torch.from_numpy(source.read(k).copy()) for k in expected_keys()}

    missing = {
        k: v for k, v in full.items() if k not in ("features.28.bias", "lin3.model.1.weight")
    }
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 2 .*features\.28\.bias, lin3\.model\.1\.weight"):
        load_perceptual(tmp_path / "missing.safetensors")

    bad = dict(full, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"features\.0\.weight \(64, 3, 5, 5\)"):
        load_perceptual(tmp_path / "shape.safetensors")

    negative = dict(full, **{"lin0.model.1.weight": -torch.ones(1, 64, 1, 1)})
    save_file(negative, str(tmp_path / "negative.safetensors"))
    with pytest.raises(ValueError, match="negative"):
        load_perceptual(tmp_path / "negative.safetensors")

    with pytest.raises(FileNotFoundError, match="perceptual_path"):
        load_perceptual(tmp_path / "absent.safetensors")
