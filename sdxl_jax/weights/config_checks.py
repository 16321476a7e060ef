"""Checks on the values of a reference ``config.json``, before any of them reaches a model.

A config.json is input like any other: a negative channel count or a list where a number belongs
would otherwise surface as a long JAX traceback (or a model of the wrong shape). Each check raises
one ``ValueError`` line naming where the value came from (``where``: the file) and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else (not UTF-8, not JSON, a list) refused."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object of settings")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count(where: str, key: str, v: Any, lo: int = 1) -> int:
    """An integer >= ``lo`` (a size or a count)."""
    if not _is_int(v) or v < lo:
        raise ValueError(f"{where}: {key}={v!r}: need an integer >= {lo}")
    return v


def counts(where: str, key: str, v: Any, n: int | None = None, lo: int = 1) -> list[int]:
    """A non-empty list of integers >= ``lo``, of ``n`` entries when given."""
    if not isinstance(v, list | tuple) or not v or not all(_is_int(x) and x >= lo for x in v):
        raise ValueError(f"{where}: {key}={v!r}: need a non-empty list of integers >= {lo}")
    if n is not None and len(v) != n:
        raise ValueError(f"{where}: {key}={v!r}: need {n} entries, one per level")
    return list(v)


def size(where: str, key: str, v: Any) -> int | tuple[int, ...]:
    """A positive integer, or a list of them (``sample_size``)."""
    return tuple(counts(where, key, v)) if isinstance(v, list | tuple) else count(where, key, v)


def number(where: str, key: str, v: Any, positive: bool = False) -> float:
    """A finite number (> 0 when ``positive``)."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (positive and v <= 0):
        raise ValueError(f"{where}: {key}={v!r}: need a finite number{' > 0' * positive}")
    return v


def numbers(where: str, key: str, v: Any, n: int, positive: bool = False) -> tuple[float, ...]:
    """``n`` finite numbers (per-channel statistics)."""
    if not isinstance(v, list | tuple) or len(v) != n:
        raise ValueError(f"{where}: {key}={v!r}: need a list of {n} numbers (one per channel)")
    return tuple(number(where, key, x, positive) for x in v)


def flag(where: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{where}: {key}={v!r}: need true or false")
    return v


def build(where: str, cls: type, **kw: Any) -> Any:
    """``cls(**kw)``, its own consistency checks reported against ``where``."""
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
