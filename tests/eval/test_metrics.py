"""The metrics against their references (pytorch-fid, torch-fidelity, torchmetrics' definition)
and closed forms."""

import warnings

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from sdxl_jax.eval import metrics

FP = {"extractor": "fid-inception-v3", "weights_sha256": "ab" * 32, "mode": "pytorch-fid"}


@pytest.mark.parametrize("n,d", [(40, 16), (300, 32), (20, 64)])  # the last rank-deficient
def test_fid_equals_pytorch_fid(n, d):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    b = rng.standard_normal((n, d)) * 1.5 + 0.4
    sa, sb = metrics.stats_of(a, FP), metrics.stats_of(b, FP)
    # pytorch-fid's statistics: np.mean and np.cov(rowvar=False) of the activations
    assert np.allclose(sa.mu, a.mean(0)) and np.allclose(sa.sigma, np.cov(a, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's `disp` deprecation inside pytorch-fid
        want = calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    got = metrics.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert abs(got - want) <= 1e-6 * abs(want)


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).standard_normal((500, 32))
    s = metrics.stats_of(f, FP)
    assert abs(metrics.fid(s, s)) < 1e-6


def test_fid_of_gaussians_is_the_closed_form():
    """Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    closed = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(closed, rel=1e-9)
    # and from samples of those Gaussians (a rotation keeps FID unchanged)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    n = 200_000
    x = (rng.standard_normal((n, d)) * np.sqrt(v1) + mu1) @ q.T
    y = (rng.standard_normal((n, d)) * np.sqrt(v2) + mu2) @ q.T
    sampled = metrics.fid(metrics.stats_of(x, FP), metrics.stats_of(y, FP))
    assert sampled == pytest.approx(closed, rel=0.02)


def test_fid_warns_below_the_feature_count():
    rng = np.random.default_rng(2)
    a, b = (
        metrics.stats_of(rng.standard_normal((10, 16)), FP),
        metrics.stats_of(rng.standard_normal((100, 16)), FP),
    )
    with pytest.warns(UserWarning, match="FID from 10 generated images with 16-d features"):
        metrics.fid(a, b)


def test_inception_score_equals_torch_fidelity_and_one_hot_closed_form():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((203, 50)) * 3
    want = isc_features_to_metric(torch.from_numpy(logits), splits=10)
    mean, std = metrics.inception_score(logits, splits=10)
    assert mean == pytest.approx(want["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(want["inception_score_std"], rel=1e-8)
    # one-hot predictions, each of k classes equally often in every split: IS = k exactly
    k, per = 7, 20
    onehot = np.zeros((10 * k * per, 50))  # p = 1 - 49e^-40: one-hot to float64 precision
    onehot[np.arange(len(onehot)), np.arange(len(onehot)) % k] = 40.0
    mean, std = metrics.inception_score(onehot, splits=10, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    # all images of one class: IS = 1
    assert metrics.inception_score(onehot[::k], splits=10, shuffle=False)[0] == pytest.approx(1.0)


def test_kid_equals_torch_fidelity():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((120, 16)), rng.standard_normal((90, 16)) * 1.2 + 0.1
    want = kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=10, kid_subset_size=50,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False,
    )  # fmt: skip
    mean, std = metrics.kid(a, b, subsets=10, subset_size=50)
    assert mean == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(want["kernel_inception_distance_std"], rel=1e-8)
    with pytest.raises(ValueError, match="subset size 100 is larger"):
        metrics.kid(a, b, subset_size=100)


def test_clip_score_identical_orthogonal_and_floored():
    e = np.eye(4)
    assert metrics.clip_score(metrics.clip_scores(e, e)) == pytest.approx(100.0)
    assert metrics.clip_score(metrics.clip_scores(e, np.roll(e, 1, axis=0))) == 0.0
    assert metrics.clip_score(metrics.clip_scores(e, -e)) == 0.0  # floored at 0
    # torchmetrics' definition on unnormalised embeddings
    rng = np.random.default_rng(5)
    img = rng.standard_normal((6, 8))
    txt = img + rng.standard_normal((6, 8))  # correlated: a positive score
    ti = torch.from_numpy(img)
    tt = torch.from_numpy(txt)
    ti, tt = ti / ti.norm(p=2, dim=-1, keepdim=True), tt / tt.norm(p=2, dim=-1, keepdim=True)
    want = max(float((100 * (ti * tt).sum(-1)).mean()), 0.0)
    assert metrics.clip_score(metrics.clip_scores(img, txt)) == pytest.approx(want, rel=1e-12)


def test_stats_roundtrip_and_refusal(tmp_path):
    f = np.random.default_rng(6).standard_normal((30, 8))
    path = metrics.save_stats(metrics.stats_of(f, FP), tmp_path / "s.npz")
    back = metrics.load_stats(path, expect=FP, dims=8)
    assert back.count == 30 and np.allclose(back.mu, f.mean(0)) and back.features.shape == (30, 8)
    with pytest.raises(metrics.StatsMismatch, match="mode: 'pytorch-fid' there, 'clean' here"):
        metrics.load_stats(path, expect={**FP, "mode": "clean"})
    with pytest.raises(metrics.StatsMismatch, match="weights_sha256"):
        metrics.load_stats(path, expect={**FP, "weights_sha256": "cd" * 32})
    with pytest.raises(metrics.StatsMismatch, match="holds 8-d features, this run uses 2048"):
        metrics.load_stats(path, expect=FP, dims=2048)
    # pytorch-fid's --save-stats format: mu and sigma only; accepted with a warning
    np.savez(tmp_path / "pf.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    with pytest.warns(UserWarning, match="does not say which extractor"):
        s = metrics.load_stats(tmp_path / "pf.npz", expect=FP)
    assert s.features is None and np.allclose(s.mu, back.mu)
    np.savez(tmp_path / "other.npz", x=f)
    with pytest.raises(ValueError, match="not FID statistics"):
        metrics.load_stats(tmp_path / "other.npz")
