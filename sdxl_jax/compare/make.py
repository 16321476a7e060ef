"""Make the sides of a study: the same prompts and seeds through ``python -m sdxl_jax.sample``
once per side (e.g. the base alone, then base + refiner), into ``OUT/a``, ``OUT/b`` ...

Every side is checked (arguments, checkpoints' configs, prompts) before any of them loads
weights. A side whose folder already has its ``manifest.json`` is kept, so a stopped ``make``
reruns only what is missing; ``OUT/study.json`` remembers the command, and a rerun with other
settings into the same folder is refused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from sdxl_jax.compare.runs import StudyError

# Options that make owns: one prompt set and one output folder per side.
OWNED = ("--prompt", "--prompts-file", "--prompt-set", "--out", "--eval")
# Settings both sides must share for their images to be pairs.
SHARED = ("seed", "num_images", "eval_count", "eval_seed", "noise")


def side_args(name: str, text: str, prompts: str, out: Path) -> argparse.Namespace:
    """``text`` (sample's options for side ``name``) with the prompts and the output folder."""
    from sdxl_jax import sample

    try:
        words = shlex.split(text)
    except ValueError as e:
        raise StudyError(f"--{name} {text!r}: {e}") from e
    for word in words:
        if word.split("=", 1)[0] in OWNED:
            raise StudyError(f"--{name}: leave out {word.split('=', 1)[0]} (make gives every "
                             "side --prompts and its own folder under --out)")  # fmt: skip
    try:
        args = sample.parse_args([*words, "--prompt-set", prompts, "--out", str(out / name)])
    except SystemExit as e:  # argparse has printed what is wrong
        raise StudyError(f"--{name} {text!r}: not valid python -m sdxl_jax.sample options") from e
    return args


def make(prompts: str, sides: dict[str, str], out: str | Path, *, log: Any = sys.stderr) -> dict:
    """Generate every side (in name order); returns {name: folder}."""
    from sdxl_jax import sample
    from sdxl_jax.inference.generate import UsageError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out} is a file; give a folder")
    if len(sides) < 2:
        raise StudyError("give at least --a and --b")
    request = {"prompts": str(prompts), "sides": dict(sorted(sides.items()))}
    record = out / "study.json"
    if record.exists() and json.loads(record.read_text("utf-8")) != request:
        raise StudyError(f"{out} holds a study made with other settings ({record}); give "
                         "another --out, or delete it to start again")  # fmt: skip
    args = {name: side_args(name, text, prompts, out) for name, text in sorted(sides.items())}
    first = next(iter(args.values()))
    for name, a in args.items():
        for key in SHARED:
            if getattr(a, key) != getattr(first, key):
                raise StudyError(
                    f"--{name} has --{key.replace('_', '-')} {getattr(a, key)} but "
                    f"--{next(iter(args))} {getattr(first, key)}: the sides must share seeds "
                    "and image counts, or no image has a pair"
                )
    try:
        for a in args.values():  # every side checked before any loads weights
            sample.fetch_remote(a)  # gs:// checkpoints copied to this disk once
            sample.validate(a)
    except (ValueError, FileNotFoundError) as e:  # UsageError, a gs:// --out
        raise StudyError(str(e)) from e
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(request, indent=2))
    folders = {}
    for name, a in args.items():
        folders[name] = Path(a.out)
        if (folders[name] / "manifest.json").exists():
            print(f"{name}: {a.out} is already made (kept)", file=log)
            continue
        print(f"{name}: {sides[name]}", file=log)
        try:
            manifest = sample.run(a)
        except UsageError as e:
            raise StudyError(f"--{name}: {e}") from e
        print(sample.summary(manifest, a.out), file=log)
    return folders
