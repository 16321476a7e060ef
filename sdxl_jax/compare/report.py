"""Numbers from a study's votes: win rates with bootstrap intervals, agreement, a ranking.

- **Win rate** of run x over run y: wins + half the ties, over the votes that are not skips.
  Its 95% interval is a percentile bootstrap that resamples *items* (a prompt + noise), not
  single votes, because several voters judging the same pair are not independent; with one vote
  per item the two are the same.
- **Agreement** between voters: Krippendorff's alpha (nominal: x / y / tie) over the pairs that
  two or more voters judged, and the plain fraction of voter pairs that chose alike.
- **Ranking** across all runs: Bradley-Terry strengths (a tie is half a win for each side),
  fitted by Hunter's MM algorithm ("MM algorithms for generalized Bradley-Terry models", 2004)
  with ``prior`` virtual ties between every two runs compared (1 by default; it keeps a run that
  never lost finite and moves nothing much once there are tens of votes), shown as the share of
  wins each would take against the field (strength / sum) and on an Elo scale
  (1000 + 400 log10 strength, geometric mean 1000), with bootstrap intervals.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}
N_BOOT = 10_000
N_BOOT_RANKING = 1_000


def win_rate(votes: list[dict[str, Any]], *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Run a's win rate over run b in ``votes`` (choices a / b / tie; skips are left out)."""
    votes = [v for v in votes if v["choice"] in SCORE]
    counts = {c: sum(v["choice"] == c for v in votes) for c in ("a", "b", "tie")}
    out: dict[str, Any] = {"votes": len(votes), "wins": counts["a"], "losses": counts["b"],
                           "ties": counts["tie"]}  # fmt: skip
    if not votes:
        return {**out, "rate": None, "low": None, "high": None, "items": 0}
    by_item: dict[str, list[float]] = defaultdict(list)
    for v in votes:
        by_item[v["item"]].append(SCORE[v["choice"]])
    sums = np.array([sum(s) for s in by_item.values()])
    ns = np.array([len(s) for s in by_item.values()], np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), (n_boot, len(sums)))
    rates = sums[pick].sum(1) / ns[pick].sum(1)
    low, high = np.percentile(rates, [2.5, 97.5])
    rate = float(sums.sum() / ns.sum())
    return {**out, "rate": rate, "low": float(low), "high": float(high), "items": len(sums)}


def krippendorff_alpha(units: dict[Any, list[str]]) -> float | None:
    """Krippendorff's alpha for nominal values; ``units`` maps a unit to the values its raters
    gave. Units with one value carry no information and are left out; None when the values
    never vary (alpha is undefined)."""
    units = {u: vals for u, vals in units.items() if len(vals) >= 2}
    cats = sorted({x for vals in units.values() for x in vals})
    if len(cats) < 2:
        return None
    index = {c: i for i, c in enumerate(cats)}
    o = np.zeros((len(cats), len(cats)))  # coincidence matrix
    for vals in units.values():
        m = len(vals)
        counts = np.zeros(len(cats))
        for x in vals:
            counts[index[x]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = o.sum(1)
    n = n_c.sum()
    observed = o.sum() - np.trace(o)
    expected = (n_c.sum() ** 2 - (n_c**2).sum()) / (n - 1)
    return float(1.0 - observed / expected)


def agreement(votes: list[dict[str, Any]]) -> dict[str, Any]:
    """How often voters agree on the pairs that several of them judged."""
    units: dict[tuple, list[str]] = defaultdict(list)
    for v in votes:
        if v["choice"] in SCORE:
            units[(v["item"], v["run_a"], v["run_b"])].append(v["choice"])
    shared = {u: c for u, c in units.items() if len(c) >= 2}
    same = total = 0
    for choices in shared.values():
        for i, x in enumerate(choices):
            for y in choices[i + 1 :]:
                same += x == y
                total += 1
    return {
        "pairs_judged_by_several": len(shared),
        "percent_agreement": 100.0 * same / total if total else None,
        "krippendorff_alpha": krippendorff_alpha(shared) if shared else None,
    }


def _wins(votes: list[dict[str, Any]], runs: list[str]) -> np.ndarray:
    """w[i, j]: wins of run i over run j (a tie is half a win for each)."""
    index = {r: i for i, r in enumerate(runs)}
    w = np.zeros((len(runs), len(runs)))
    for v in votes:
        if v["choice"] in SCORE:
            i, j = index[v["run_a"]], index[v["run_b"]]
            s = SCORE[v["choice"]]
            w[i, j] += s
            w[j, i] += 1.0 - s
    return w


def _fit(w: np.ndarray, prior: float, tol: float = 1e-12) -> np.ndarray:
    """Hunter's MM iteration for the strengths (geometric mean 1) from the win matrix."""
    w = w + prior / 2 * ((w + w.T) > 0)
    n = w + w.T
    wins = w.sum(1)
    p = np.ones(len(w))
    for _ in range(100_000):
        with np.errstate(divide="ignore", invalid="ignore"):
            denom = np.where(n > 0, n / (p[:, None] + p[None, :]), 0.0).sum(1)
            new = np.where(denom > 0, wins / denom, 1.0)
        new = np.maximum(new, 1e-300)
        new /= np.exp(np.log(new).mean())
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    return p


def bradley_terry(
    votes: list[dict[str, Any]], runs: list[str], *, prior: float = 1.0
) -> np.ndarray:
    """Bradley-Terry strengths of ``runs`` (geometric mean 1) from ``votes``."""
    return _fit(_wins(votes, runs), prior)


def ranking(
    votes: list[dict[str, Any]], runs: list[str], *, prior: float = 1.0,
    n_boot: int = N_BOOT_RANKING, seed: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Runs from best to worst with strengths, shares and Elo, each with a 95% interval."""
    votes = [v for v in votes if v["choice"] in SCORE]
    p = bradley_terry(votes, runs, prior=prior)
    by_item: dict[str, list] = defaultdict(list)
    for v in votes:
        by_item[v["item"]].append(v)
    per_item = np.array([_wins(vs, runs) for vs in by_item.values()])  # [items, runs, runs]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if len(per_item) else 0):
        counts = np.bincount(rng.integers(0, len(per_item), len(per_item)),
                             minlength=len(per_item))  # fmt: skip
        boots.append(_fit(np.tensordot(counts, per_item, 1), prior))
    boot = np.array(boots) if boots else p[None]
    share, boot_share = p / p.sum(), boot / boot.sum(1, keepdims=True)
    elo, boot_elo = 1000 + 400 * np.log10(p), 1000 + 400 * np.log10(boot)
    rows = []
    for i in np.argsort(-p, kind="stable"):
        rows.append({
            "run": runs[i], "strength": float(p[i]),
            "share": float(share[i]), "share_low": float(np.percentile(boot_share[:, i], 2.5)),
            "share_high": float(np.percentile(boot_share[:, i], 97.5)),
            "elo": float(elo[i]), "elo_low": float(np.percentile(boot_elo[:, i], 2.5)),
            "elo_high": float(np.percentile(boot_elo[:, i], 97.5)),
        })  # fmt: skip
    return rows


def _groups(votes: list[dict[str, Any]], key: str) -> dict[str, dict]:
    groups: dict[str, list] = defaultdict(list)
    for v in votes:
        groups[str(v[key]) if v[key] is not None else "(none)"].append(v)
    return {name: win_rate(vs) for name, vs in sorted(groups.items())}


def build(votes: list[dict[str, Any]], runs: dict[str, str]) -> dict[str, Any]:
    """The whole report: per pair of runs overall / per voter / per category, agreement, and
    (for three or more runs) the ranking."""
    names = sorted(runs)
    pairs = []
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            vs = [v for v in votes if (v["run_a"], v["run_b"]) == (x, y)]
            row = {"a": x, "b": y, "overall": win_rate(vs), "per_voter": _groups(vs, "voter")}
            if any(v["category"] for v in vs):
                row["per_category"] = _groups(vs, "category")
            pairs.append(row)
    out = {
        "runs": runs,
        "votes": len(votes),
        "skips": sum(v["choice"] == "skip" for v in votes),
        "voters": sorted({v["voter"] for v in votes}),
        "pairs": pairs,
        "agreement": agreement(votes),
        "method": "win rate = (wins + ties / 2) / votes, skips left out; 95% percentile "
        f"bootstrap over items ({N_BOOT} resamples); ranking: Bradley-Terry (MM), 1 virtual "
        "tie per compared pair, bootstrap over items",
    }
    if len(names) > 2:
        out["ranking"] = ranking(votes, names)
    return out


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}"


def text(report: dict[str, Any]) -> str:
    """The report for the terminal."""
    lines = [f"{report['votes']} votes ({report['skips']} skipped) from "
             f"{len(report['voters'])} voters"]  # fmt: skip
    for row in report["pairs"]:
        o = row["overall"]
        lines.append(
            f"{row['a']} over {row['b']}: {_pct(o['rate'])}% [{_pct(o['low'])}, {_pct(o['high'])}]"
            f"  ({o['wins']} wins, {o['losses']} losses, {o['ties']} ties)"
        )
        for name, r in row.get("per_category", {}).items():
            lines.append(f"  {name:24.24s} {_pct(r['rate'])}% [{_pct(r['low'])}, "
                         f"{_pct(r['high'])}]  n={r['votes']}")  # fmt: skip
    a = report["agreement"]
    if a["pairs_judged_by_several"]:
        alpha = a["krippendorff_alpha"]
        lines.append(f"agreement on {a['pairs_judged_by_several']} pairs judged by several: "
                     f"{a['percent_agreement']:.1f}%, Krippendorff's alpha "
                     f"{'n/a' if alpha is None else f'{alpha:.3f}'}")  # fmt: skip
    for r in report.get("ranking", []):
        lines.append(f"  {r['run']}: share {_pct(r['share'])}% [{_pct(r['share_low'])}, "
                     f"{_pct(r['share_high'])}], Elo {r['elo']:.0f}")  # fmt: skip
    return "\n".join(lines)


def write(report: dict[str, Any], out: str | Path) -> list[Path]:
    """``report.json`` and ``preference.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "preference.png")
    return [out / "report.json", out / "preference.png"]


def _bars(report: dict[str, Any]) -> tuple[list[str], list[float], list[float], list[float]]:
    """Overall preference per run, as the paper's Fig. 1 (left): labels, values, lows, highs."""
    runs = report["runs"]
    label = lambda r: f"{r} ({'/'.join(Path(runs[r]).parts[-2:])})"  # noqa: E731
    if "ranking" in report:
        rows = report["ranking"]
        return ([label(r["run"]) for r in rows], [r["share"] for r in rows],
                [r["share_low"] for r in rows], [r["share_high"] for r in rows])  # fmt: skip
    row = report["pairs"][0]
    o = row["overall"]
    if o["rate"] is None:
        return [], [], [], []
    return ([label(row["a"]), label(row["b"])], [o["rate"], 1 - o["rate"]],
            [o["low"], 1 - o["high"]], [o["high"], 1 - o["low"]])  # fmt: skip


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [row for row in report["pairs"] if row.get("per_category")]
    fig, axes = plt.subplots(1, 2 if cats else 1, figsize=(12 if cats else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    labels, values, lows, highs = _bars(report)
    y = np.arange(len(values))
    err = [np.subtract(values, lows), np.subtract(highs, values)]
    ax.barh(y, np.multiply(values, 100), 0.6, xerr=np.multiply(err, 100), color="#4c72b0",
            capsize=4)  # fmt: skip
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    for i, (v, hi) in enumerate(zip(values, highs, strict=True)):
        ax.text(100 * hi + 2, i, f"{100 * v:.1f}%", va="center", fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xlabel("preferred (%) with 95% interval")
    ax.set_title(f"{report['votes'] - report['skips']} votes, {len(report['voters'])} voters")
    if cats:
        ax = axes[0][1]
        for k, row in enumerate(cats):
            names = list(row["per_category"])
            r = row["per_category"]
            vals = np.array([r[c]["rate"] if r[c]["rate"] is not None else np.nan for c in names])
            lo = np.array([r[c]["low"] if r[c]["low"] is not None else np.nan for c in names])
            hi = np.array([r[c]["high"] if r[c]["high"] is not None else np.nan for c in names])
            h = 0.8 / len(cats)
            yy = np.arange(len(names)) + k * h
            ax.barh(yy, 100 * vals, h, xerr=[100 * (vals - lo), 100 * (hi - vals)], capsize=2,
                    label=f"{row['a']} over {row['b']}")  # fmt: skip
            ax.set_yticks(np.arange(len(names)) + 0.4 - h / 2, names)
        ax.axvline(50, color="k", lw=0.8, ls="--")
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("win rate per prompt category (%)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
