"""A preference study at toy size with machine voters: does the study find the better run?

Two sides made by ``compare make`` on the synthetic captions (e.g. the tiny base alone against
base + refiner) are served by the real server; each voter fetches the pairs over HTTP as the
page does and prefers the image the exact synthetic scorer finds more right (colour, shape,
position each count one; equal counts: a tie), except that with probability ``--noise`` it
clicks at random, as a tired human might. The report's win rate is then set beside the exact
scores of each side.

  PYTHONPATH=. python benchmarks/compare_toy_study.py --a study/a --b study/b [--voters 3]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_jax.compare import report, server
from sdxl_jax.compare.runs import load_study
from sdxl_jax.compare.votes import VoteStore, read_votes
from sdxl_jax.data import synthetic


def fetch(url: str, data: dict | None = None) -> bytes:
    body = None if data is None else json.dumps(data).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body)) as r:
        return r.read()


def right_count(png: bytes, caption: str) -> int:
    return sum(synthetic.score(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), caption)
               .get(k, False) for k in ("colour", "shape", "position"))  # fmt: skip


def vote_all(url: str, voter: str, noise: float, rng: random.Random) -> None:
    pair = json.loads(fetch(f"{url}/api/next?voter={voter}"))["pair"]
    while pair is not None:
        left, right = (right_count(fetch(url + pair[s]), pair["prompt"]) for s in ("left", "right"))
        if rng.random() < noise:
            choice = rng.choice(["left", "right", "tie"])
        else:
            choice = "left" if left > right else "right" if right > left else "tie"
        answer = fetch(url + "/api/vote", {"token": pair["token"], "voter": voter,
                                           "choice": choice})  # fmt: skip
        pair = json.loads(answer)["pair"]


def exact_scores(folder: Path) -> dict[str, float]:
    manifest = json.loads((folder / "manifest.json").read_text())
    images = [np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in manifest["images"]]
    return synthetic.accuracy(images, [r["prompt"] for r in manifest["images"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--voters", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.2, help="chance a vote is random")
    p.add_argument("--votes", default=None, help="votes file (default: beside --a)")
    args = p.parse_args()
    votes_path = Path(args.votes or Path(args.a).parent / "machine_votes.sqlite")
    votes_path.unlink(missing_ok=True)
    store = VoteStore(votes_path, load_study({"a": args.a, "b": args.b}))
    srv, url = server.serve_in_thread(store)
    rng = random.Random(0)
    for k in range(args.voters):
        vote_all(url, f"machine{k}", args.noise, rng)
    srv.shutdown()
    built = report.build(*read_votes(votes_path))
    print(report.text(built))
    for name in ("a", "b"):
        s = exact_scores(Path(getattr(args, name)))
        print(f"{name} ({getattr(args, name)}): exact scorer " +
              ", ".join(f"{k} {100 * v:.1f}%" for k, v in s.items()))  # fmt: skip


if __name__ == "__main__":
    main()
