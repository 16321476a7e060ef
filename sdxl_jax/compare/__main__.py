"""A blind preference study between two (or up to four) sets of generated images.

  # 1. make the sides: the same prompts and seeds through `python -m sdxl_jax.sample` per side
  python -m sdxl_jax.compare make --prompts PartiPrompts.tsv --out study/ \\
      --a '--checkpoint sdxl-base --steps 40' \\
      --b '--checkpoint sdxl-base --refiner sdxl-refiner --steps 40'
  # 2. vote in a browser (http://127.0.0.1:8080/): one prompt, its two images in random
  #    left/right order; keys: left/right arrow, down arrow or t for a tie, s to skip
  python -m sdxl_jax.compare serve --a study/a --b study/b --votes study/votes.sqlite
  # 3. win rate of a over b with a 95% interval, per voter and per prompt category
  python -m sdxl_jax.compare report --votes study/votes.sqlite --out study/report/

`serve` takes any folders `python -m sdxl_jax.sample` wrote from the same prompts and seeds
(images are matched by prompt, seed and image number; the others are listed and left out).
With --c / --d every pair of runs is voted and `report` adds a Bradley-Terry ranking.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdxl_jax.compare.runs import RUN_NAMES, StudyError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sdxl_jax.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="generate the sides of a study (same prompts and seeds)")
    m.add_argument("--prompts", required=True, help="a prompt file (.txt one per "
                   "line, PartiPrompts .tsv, DrawBench .csv), a prepared dataset or "
                   "'synthetic'")  # fmt: skip
    m.add_argument("--out", required=True, help="study folder: one subfolder per side")
    for i, name in enumerate(RUN_NAMES):
        m.add_argument(f"--{name}", required=i < 2, metavar="'SAMPLE ARGS'",
                       help=f"side {name}: python -m sdxl_jax.sample options, quoted (not "
                       "--prompt*/--out), e.g. '--checkpoint base --steps 30'")  # fmt: skip
    s = sub.add_parser("serve", help="serve the voting page")
    for i, name in enumerate(RUN_NAMES):
        s.add_argument(f"--{name}", required=i < 2, metavar="FOLDER",
                       help=f"run {name}: a python -m sdxl_jax.sample output folder")  # fmt: skip
    s.add_argument("--votes", default="votes.sqlite", help="SQLite file of the votes "
                   "(default votes.sqlite; created, or resumed)")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address to listen on "
                   "(default 127.0.0.1: this machine only; anything else is reachable by "
                   "others)")  # fmt: skip
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: a free one)")
    r = sub.add_parser("report", help="win rates, intervals, agreement (and a ranking)")
    r.add_argument("--votes", required=True, help="the SQLite file serve wrote")
    r.add_argument("--out", help="folder for report.json and preference.png (default: print)")
    return p.parse_args(argv)


def _runs(args: argparse.Namespace) -> dict[str, str]:
    return {n: getattr(args, n) for n in RUN_NAMES if getattr(args, n, None) is not None}


def serve(args: argparse.Namespace) -> int:
    from sdxl_jax.compare import server
    from sdxl_jax.compare.runs import load_study
    from sdxl_jax.compare.votes import VoteStore

    if not 0 <= args.port <= 65535:
        raise StudyError(f"--port {args.port}: give 0 to 65535")
    study = load_study(_runs(args))
    for line in study.left_out[:10]:
        print(f"left out: {line}", file=sys.stderr)
    if len(study.left_out) > 10:
        print(f"left out: ... {len(study.left_out) - 10} more", file=sys.stderr)
    if Path(args.votes).is_dir():
        raise StudyError(f"--votes {args.votes} is a folder; give a file name")
    store = VoteStore(args.votes, study)
    n_pairs = len(study.pairs())
    print(f"{len(study.items)} matched images x {n_pairs} pair{'s' * (n_pairs > 1)} of runs = "
          f"{len(store.candidates)} votes per voter", file=sys.stderr)  # fmt: skip
    if not server.is_local(args.host):
        print(f"warning: --host {args.host} lets anyone who reaches this machine vote and see "
              "the images; there is no login", file=sys.stderr)  # fmt: skip
    try:
        server.serve(store, args.host, args.port)
    except OSError as e:
        raise StudyError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); try "
                         "another --port (0 picks a free one)") from e  # fmt: skip
    return 0


def report(args: argparse.Namespace) -> int:
    from sdxl_jax.compare import report as report_lib
    from sdxl_jax.compare.votes import read_votes

    votes, runs = read_votes(args.votes)
    if not runs:
        raise StudyError(f"--votes {args.votes} has no study in it")
    built = report_lib.build(votes, runs)
    print(report_lib.text(built))
    if args.out:
        for path in report_lib.write(built, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "make":
            from sdxl_jax.compare.make import make

            make(args.prompts, _runs(args), args.out)
            return 0
        return serve(args) if args.command == "serve" else report(args)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
