"""How fast the preference study answers at PartiPrompts' size: the time from a vote to the
next pair (what a voter waits for), with one voter and with several at once, once the votes
file already holds thousands of votes; and how long ``compare report`` takes on them.

  PYTHONPATH=. python benchmarks/compare_study.py [--prompts 1632] [--runs 2] [--prefill 5]

Runs are written with the real ``sample`` output writer (64 px flat images); the server is the
real one on loopback; the client is urllib (no browser: its rendering is not ours to time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from sdxl_jax.compare import report, server
from sdxl_jax.compare.runs import RUN_NAMES, load_study
from sdxl_jax.compare.votes import VoteStore, read_votes
from tests.compare.fixtures import write_run


def round_trip(url: str, voter: str, token: str) -> tuple[float, str | None]:
    """POST a vote, then fetch both images of the next pair: seconds, next token."""
    t = time.perf_counter()
    req = urllib.request.Request(url + "/api/vote", method="POST",
                                 data=json.dumps({"token": token, "voter": voter,
                                                  "choice": "left"}).encode())  # fmt: skip
    with urllib.request.urlopen(req) as r:
        pair = json.loads(r.read())["pair"]
    if pair is not None:
        for side in ("left", "right"):
            with urllib.request.urlopen(url + pair[side]) as r:
                r.read()
    return time.perf_counter() - t, pair and pair["token"]


def first_token(url: str, voter: str) -> str:
    with urllib.request.urlopen(f"{url}/api/next?voter={voter}") as r:
        return json.loads(r.read())["pair"]["token"]


def voter_loop(url: str, voter: str, n: int, out: list[float]) -> None:
    token = first_token(url, voter)
    for _ in range(n):
        dt, token = round_trip(url, voter, token)
        out.append(dt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompts", type=int, default=1632, help="PartiPrompts has 1632")
    p.add_argument("--runs", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--prefill", type=int, default=5, help="voters who voted everything first")
    p.add_argument("--votes-each", type=int, default=100, help="timed votes per voter")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    prompts = [(f"prompt {i}", f"category {i % 12}") for i in range(args.prompts)]
    t = time.perf_counter()
    runs = {n: write_run(tmp / n, n, prompts=prompts, size=64) for n in RUN_NAMES[: args.runs]}
    print(f"wrote {args.runs} runs of {args.prompts} images in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)  # fmt: skip
    store = VoteStore(tmp / "votes.sqlite", load_study(runs))
    t = time.perf_counter()
    for k in range(args.prefill):
        while (pair := store.next_pair(f"prefill{k}")) is not None:
            store.vote(pair["token"], f"prefill{k}", "left")
    prefilled = args.prefill * len(store.candidates)
    print(f"prefilled {prefilled} votes in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    srv, url = server.serve_in_thread(store)
    rows = []
    for clients in (1, 4):
        times: list[float] = []
        threads = [threading.Thread(target=voter_loop, args=(url, f"c{clients}_{i}",
                                                             args.votes_each, times))
                   for i in range(clients)]  # fmt: skip
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        q = statistics.quantiles(times, n=20)
        rows.append((clients, len(times), 1000 * statistics.median(times), 1000 * q[18],
                     len(times) / wall))  # fmt: skip
    srv.shutdown()
    t = time.perf_counter()
    votes, names = read_votes(store.path)
    built = report.build(votes, names)
    report_s = time.perf_counter() - t
    print(f"\n{args.prompts} prompts x {args.runs} runs ({len(store.candidates)} pairs per "
          f"voter), {prefilled} votes already in the file\n")  # fmt: skip
    print("| voters at once | votes timed | vote -> next pair + both images, median ms | p95 ms "
          "| votes/s |\n|---|---|---|---|---|")  # fmt: skip
    for c, n, med, p95, rate in rows:
        print(f"| {c} | {n} | {med:.1f} | {p95:.1f} | {rate:.0f} |")
    print(f"\ncompare report on {built['votes']} votes: {report_s:.1f} s")


if __name__ == "__main__":
    main()
