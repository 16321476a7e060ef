"""``case``: names the iteration of a test's loop that failed.

Tests that check many combinations (spacings x step counts x windows) loop inside one test
instead of multiplying parametrized cases; ``with case(spacing=..., steps=...):`` adds the
combination to the failure's message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def case(**where: object) -> Iterator[None]:
    try:
        yield
    except BaseException as e:
        e.add_note("in case: " + ", ".join(f"{k}={v!r}" for k, v in where.items()))
        raise
