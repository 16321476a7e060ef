"""InceptionExtractor against the references: pytorch-fid's InceptionV3 on ToTensor'd images
(its ``get_activations``), and clean-fid's resizer followed by the same network.

The random calibrated pytorch-fid model and its safetensors file come from
tests/models/test_inception.py (``reference``).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from cleanfid.resize import make_resizer

from sdxl_jax.eval.inception import InceptionExtractor, clean_resize
from sdxl_jax.inference import runtime
from tests.models.test_inception import KEYS, assert_close, reference, torch_features


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tmp_path_factory)


def uint8_images(seed: int, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def to_torch(images: list[np.ndarray], scale: float = 255) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float32) / scale).permute(0, 3, 1, 2)


def test_clean_resize_is_cleanfids():
    resizer = make_resizer("PIL", False, "bicubic", (299, 299))
    for im in uint8_images(0, [(37, 53), (300, 299), (512, 384), (299, 299)]):
        want = resizer(im)
        got = clean_resize(im)
        assert got.shape == want.shape == (299, 299, 3) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_pytorch_fid_mode_over_all_devices(ref):
    """Two image sizes interleaved, split over the 8 simulated devices, the last batch of each
    size padded: the features of each image in its place, as pytorch-fid computes them."""
    net, wrapper, path = ref
    sizes = [(64, 80), (96, 96), (64, 80), (64, 80), (96, 96)]
    images = uint8_images(1, sizes)
    extractor = InceptionExtractor(path, batch_size=2)
    assert extractor.batch_size == runtime.padded(2, len(jax.local_devices()))
    got = extractor.features(images)
    for size in set(sizes):
        idx = [i for i, s in enumerate(sizes) if s == size]
        want = torch_features(net, wrapper, to_torch([images[i] for i in idx]))
        assert_close({k: got[k][idx] for k in KEYS}, want)
    assert all(v.dtype == np.float64 for v in got.values())


def test_clean_mode_on_one_device(ref):
    """clean-fid's resize, then /255 into the network: several batches, the last one padded."""
    net, wrapper, path = ref
    images = uint8_images(2, [(50, 70), (299, 299), (120, 90)])
    mesh = runtime.make_mesh(jax.local_devices()[:1])
    extractor = InceptionExtractor(path, mode="clean", batch_size=2, mesh=mesh)
    got = extractor.features(images)
    resizer = make_resizer("PIL", False, "bicubic", (299, 299))
    want = torch_features(net, wrapper, to_torch([resizer(im) for im in images]), resize=False)
    assert_close(got, want)
    batch = extractor.features(np.stack(images[1:2]))  # a uint8 [B, H, W, 3] array works too
    np.testing.assert_allclose(batch["2048"], got["2048"][1:2], rtol=1e-6, atol=1e-6)


def test_fingerprint_and_input_checks(ref):
    path = ref[2]
    mesh = runtime.make_mesh(jax.local_devices()[:1])
    extractor = InceptionExtractor(path, mode="clean", batch_size=4, mesh=mesh)
    fp = extractor.fingerprint
    assert json.loads(json.dumps(fp)) == fp
    assert fp == {
        "extractor": "fid-inception-v3",
        "weights_sha256": extractor.info.sha256,
        "layout": "pytorch-fid",
        "mode": "clean",
        "resolution": 299,
    }
    assert extractor.mode == "clean" and extractor.info.path.name == path.split("/")[-1]
    with pytest.raises(ValueError, match="mode must be one of"):
        InceptionExtractor(path, mode="tf", mesh=mesh)
    with pytest.raises(ValueError, match=r"image 1: expected uint8 \[H, W, 3\]"):
        extractor.features([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="image 0"):
        extractor.features([np.zeros((8, 8), np.uint8)])
    empty = extractor.features([])
    assert {k: v.shape for k, v in empty.items()}["2048"] == (0, 2048)
