"""The study's statistics against independent references: closed forms, scipy's bootstrap and
optimiser, and the ``krippendorff`` package; then ``compare report`` on a real votes file."""

from __future__ import annotations

import json

import krippendorff
import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from sdxl_jax.compare import report
from sdxl_jax.compare.__main__ import main
from sdxl_jax.compare.runs import load_study
from sdxl_jax.compare.votes import VoteStore
from tests.compare.fixtures import write_run


def vote(choice, item, voter="ann", a="a", b="b", category=None):
    return dict(choice=choice, item=str(item), voter=voter, run_a=a, run_b=b, category=category)


def test_win_rate_counts_ties_as_half_and_leaves_out_skips():
    votes = [vote("a", 0), vote("a", 1), vote("b", 2), vote("tie", 3), vote("skip", 4)]
    r = report.win_rate(votes)
    assert (r["votes"], r["wins"], r["losses"], r["ties"]) == (4, 2, 1, 1)
    assert r["rate"] == pytest.approx(2.5 / 4)


def test_interval_matches_scipy_bootstrap_and_the_normal_approximation():
    rng = np.random.default_rng(1)
    choices = rng.choice(["a", "b", "tie"], size=400, p=[0.55, 0.35, 0.10])
    r = report.win_rate([vote(c, i) for i, c in enumerate(choices)])  # one vote per item
    scores = np.array([report.SCORE[c] for c in choices])
    ref = scipy.stats.bootstrap((scores,), np.mean, confidence_level=0.95, method="percentile",
                                n_resamples=10_000, random_state=2).confidence_interval  # fmt: skip
    assert r["low"] == pytest.approx(ref.low, abs=0.006)
    assert r["high"] == pytest.approx(ref.high, abs=0.006)
    half = 1.96 * scores.std() / np.sqrt(len(scores))
    assert r["low"] == pytest.approx(scores.mean() - half, abs=0.008)
    assert r["high"] == pytest.approx(scores.mean() + half, abs=0.008)


def test_interval_resamples_items_not_votes():
    # 20 items, each judged identically by 10 voters: the evidence is 20 items, not 200 votes.
    votes = [vote("a" if i % 2 else "b", i, voter=f"v{k}") for i in range(20) for k in range(10)]
    r = report.win_rate(votes)
    single = report.win_rate([vote("a" if i % 2 else "b", i) for i in range(20)])
    assert r["rate"] == 0.5 and r["items"] == 20
    assert r["high"] - r["low"] == pytest.approx(single["high"] - single["low"], abs=0.02)
    assert r["high"] - r["low"] > 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krippendorff_alpha_matches_the_reference_package(seed):
    rng = np.random.default_rng(seed)
    voters, units = 5, 40
    truth = rng.choice(["a", "b", "tie"], units, p=[0.5, 0.4, 0.1])
    data = np.full((voters, units), np.nan)
    votes = []
    code = {"a": 0, "b": 1, "tie": 2}
    for v in range(voters):
        for u in range(units):
            if rng.random() < 0.6:  # not everyone judges every pair
                c = truth[u] if rng.random() < 0.7 else rng.choice(["a", "b", "tie"])
                data[v, u] = code[c]
                votes.append(vote(c, u, voter=f"v{v}"))
    ref = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert report.agreement(votes)["krippendorff_alpha"] == pytest.approx(ref, abs=1e-9)


def test_agreement_of_voters_who_always_agree():
    votes = [vote(c, i, voter=v) for i, c in enumerate("aabba") for v in ("x", "y")]
    out = report.agreement([{**x, "choice": {"a": "a", "b": "b"}[x["choice"]]} for x in votes])
    assert out["percent_agreement"] == 100.0 and out["krippendorff_alpha"] == pytest.approx(1.0)


def _bt_reference(votes, runs, prior):
    """Bradley-Terry by maximising its log-likelihood with scipy (ties half a win each)."""
    k = len(runs)
    w = np.zeros((k, k))
    for v in votes:
        i, j, s = runs.index(v["run_a"]), runs.index(v["run_b"]), report.SCORE[v["choice"]]
        w[i, j] += s
        w[j, i] += 1 - s
    w += prior / 2 * ((w + w.T) > 0)

    def nll(theta):
        theta = np.concatenate([[0.0], theta])
        diff = theta[:, None] - theta[None, :]
        return -(w * -np.logaddexp(0, -diff)).sum()

    theta = scipy.optimize.minimize(nll, np.zeros(k - 1), method="BFGS", tol=1e-12).x
    theta = np.concatenate([[0.0], theta])
    return np.exp(theta - theta.mean())


def test_bradley_terry_matches_direct_maximum_likelihood():
    rng = np.random.default_rng(3)
    runs = ["a", "b", "c", "d"]
    true = np.array([3.0, 1.5, 1.0, 0.4])
    votes = []
    for n in range(300):
        i, j = sorted(rng.choice(4, 2, replace=False))
        pa = true[i] / (true[i] + true[j])
        c = "tie" if rng.random() < 0.1 else ("a" if rng.random() < pa else "b")
        votes.append(vote(c, n, a=runs[i], b=runs[j]))
    for prior in (0.0, 1.0):
        ours = report.bradley_terry(votes, runs, prior=prior)
        np.testing.assert_allclose(ours, _bt_reference(votes, runs, prior), rtol=1e-5)
    rows = report.ranking(votes, runs, n_boot=50)
    assert [r["run"] for r in rows] == runs  # the true order
    assert all(r["share_low"] <= r["share"] <= r["share_high"] for r in rows)


def test_bradley_terry_of_two_runs_is_the_win_ratio():
    votes = [vote("a", i) for i in range(30)] + [vote("b", i) for i in range(30, 40)]
    votes += [vote("tie", i) for i in range(40, 44)]
    p = report.bradley_terry(votes, ["a", "b"], prior=0.0)
    assert p[0] / (p[0] + p[1]) == pytest.approx(report.win_rate(votes)["rate"], rel=1e-9)


def test_report_command_writes_json_and_chart(tmp_path, capsys):
    runs = {n: write_run(tmp_path / n, n) for n in ("a", "b")}
    store = VoteStore(tmp_path / "votes.sqlite", load_study(runs))
    clicks = {"ann": ["left", "right", "tie", "skip"], "bob": ["left", "left", "left", "left"]}
    expected = {"a": 0, "b": 0, "tie": 0}
    for voter, choices in clicks.items():
        for clicked in choices:
            pair = store.next_pair(voter)
            run = store.image(pair["token"], clicked).parent.name if clicked in ("left", "right") \
                else clicked  # fmt: skip
            expected[run] = expected.get(run, 0) + 1
            store.vote(pair["token"], voter, clicked)
    assert main(["report", "--votes", str(store.path), "--out", str(tmp_path / "rep")]) == 0
    got = json.loads((tmp_path / "rep" / "report.json").read_text())
    overall = got["pairs"][0]["overall"]
    assert (overall["wins"], overall["losses"], overall["ties"]) == (
        expected["a"], expected["b"], expected["tie"])  # fmt: skip
    assert got["skips"] == 1 and got["voters"] == ["ann", "bob"]
    assert set(got["pairs"][0]["per_category"]) == {"Animals", "Food & Beverage"}
    assert set(got["pairs"][0]["per_voter"]) == {"ann", "bob"}
    assert got["agreement"]["pairs_judged_by_several"] >= 1
    assert (tmp_path / "rep" / "preference.png").stat().st_size > 10_000
    assert "a over b" in capsys.readouterr().out


def test_report_of_four_runs_ranks_them(tmp_path):
    runs = {n: write_run(tmp_path / n, n) for n in ("a", "b", "c", "d")}
    store = VoteStore(tmp_path / "votes.sqlite", load_study(runs))
    better = {"a": 3, "b": 2, "c": 1, "d": 0}  # the voter always picks the better run
    while (pair := store.next_pair("ann")) is not None:
        left, right = (store.image(pair["token"], s).parent.name for s in ("left", "right"))
        store.vote(pair["token"], "ann", "left" if better[left] > better[right] else "right")
    assert main(["report", "--votes", str(store.path), "--out", str(tmp_path / "rep")]) == 0
    got = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["run"] for r in got["ranking"]] == ["a", "b", "c", "d"]
    assert len(got["pairs"]) == 6


def test_report_refuses_what_is_not_a_votes_file(tmp_path, capsys):
    (tmp_path / "x.sqlite").write_text("hello " * 100)
    assert main(["report", "--votes", str(tmp_path / "x.sqlite")]) == 2
    assert main(["report", "--votes", str(tmp_path / "missing.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "not a votes database" in err and "does not exist" in err
