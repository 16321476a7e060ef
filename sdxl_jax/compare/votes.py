"""The votes of a study in one SQLite file.

Every pair shown to a voter is written first (``shown``: an unguessable token, the item, the two
runs and which of them is on the left), every vote after (``votes``, one per token), each in
its own transaction before the server answers: a server killed at any moment loses no vote that
a voter saw acknowledged, a reload shows the pair it had shown, and two voters at once are both
recorded (WAL journal; writers wait for each other). The ``study`` table remembers which folders
the runs were, so a votes file is never reused for other runs by mistake.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdxl_jax.compare.runs import Study, StudyError

CHOICES = ("left", "right", "tie", "skip")
MAX_VOTER = 64  # characters of a voter's name

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (run TEXT PRIMARY KEY, folder TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shown (
    token TEXT PRIMARY KEY, voter TEXT NOT NULL, item TEXT NOT NULL, run_a TEXT NOT NULL,
    run_b TEXT NOT NULL, a_side TEXT NOT NULL CHECK (a_side IN ('left', 'right')),
    shown_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE REFERENCES shown(token),
    voter TEXT NOT NULL, item TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    image_of_prompt INTEGER NOT NULL, category TEXT, run_a TEXT NOT NULL, run_b TEXT NOT NULL,
    a_side TEXT NOT NULL, clicked TEXT NOT NULL, choice TEXT NOT NULL
    CHECK (choice IN ('a', 'b', 'tie', 'skip')), time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS votes_voter ON votes (voter);
CREATE INDEX IF NOT EXISTS shown_voter ON shown (voter);
"""


class VoteError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_voter(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise VoteError(400, "give your name (any text, the same each time)")
    name = name.strip()
    if len(name) > MAX_VOTER or not name.isprintable():
        raise VoteError(400, f"a name is at most {MAX_VOTER} printable characters")
    return name


class VoteStore:
    """The study's votes; one connection per call, so that server threads can share it."""

    def __init__(self, path: str | Path, study: Study, *, seed: int | None = None):
        self.path = Path(path)
        self.study = study
        self.items = {item.key: item for item in study.items}
        self.candidates = [(item.key, a, b) for item in study.items for a, b in study.pairs()]
        self._random = random.Random(seed) if seed is not None else random.SystemRandom()
        try:
            with self._write() as db:
                for statement in SCHEMA.split(";"):
                    db.execute(statement)
                self._check_runs(db)
        except sqlite3.DatabaseError as e:
            raise StudyError(f"--votes {self.path}: not a votes database ({e})") from e

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction that holds the write lock from its start (no lost updates)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _check_runs(self, db: sqlite3.Connection) -> None:
        known = dict(db.execute("SELECT run, folder FROM study").fetchall())
        wanted = {name: str(folder) for name, folder in self.study.runs.items()}
        if known and known != wanted:
            raise StudyError(
                f"--votes {self.path} holds votes for other runs ({known}); give a new --votes "
                "file for these runs, or the same folders as before"
            )
        if not known:
            db.executemany("INSERT INTO study VALUES (?, ?)", sorted(wanted.items()))

    def progress(self, voter: str) -> dict[str, int]:
        with self._connect() as db:
            (done,) = db.execute("SELECT COUNT(*) FROM votes WHERE voter = ?", (voter,)).fetchone()
        return {"done": done, "total": len(self.candidates)}

    def next_pair(self, voter: str) -> dict[str, Any] | None:
        """The pair to show ``voter``: the one shown and not yet voted (a reload), else a new
        one among those this voter has not voted, the least-voted first; None when all are."""
        voter = check_voter(voter)
        with self._write() as db:
            row = db.execute(
                "SELECT token, item, run_a, run_b, a_side FROM shown WHERE voter = ? AND token "
                "NOT IN (SELECT token FROM votes) ORDER BY shown_at DESC LIMIT 1", (voter,),
            ).fetchone()  # fmt: skip
            if row is None:
                row = self._new_pair(db, voter)
        return None if row is None else {"token": row[0], "prompt": self.items[row[1]].prompt}

    def _new_pair(self, db: sqlite3.Connection, voter: str) -> tuple | None:
        rows = db.execute(
            "SELECT item, run_a, run_b, COUNT(*) FROM votes GROUP BY item, run_a, run_b"
        )
        counts = {(item, a, b): n for item, a, b, n in rows}
        mine = set(db.execute("SELECT item, run_a, run_b FROM votes WHERE voter = ?", (voter,)))
        left = [c for c in self.candidates if c not in mine]
        if not left:
            return None
        fewest = min(counts.get(c, 0) for c in left)
        item, a, b = self._random.choice([c for c in left if counts.get(c, 0) == fewest])
        token = secrets.token_urlsafe(16)
        a_side = self._random.choice(("left", "right"))
        db.execute("INSERT INTO shown VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (token, voter, item, a, b, a_side, time.time()))  # fmt: skip
        return token, item, a, b, a_side

    def image(self, token: str, side: str) -> Path:
        """The file shown on ``side`` of the pair ``token``."""
        if side not in ("left", "right"):
            raise VoteError(404, "no such image")
        with self._connect() as db:
            row = db.execute("SELECT item, run_a, run_b, a_side FROM shown WHERE token = ?",
                             (token,)).fetchone()  # fmt: skip
        if row is None or row[0] not in self.items:
            raise VoteError(404, "no such pair")
        item, a, b, a_side = row
        return self.items[item].files[a if side == a_side else b]

    def vote(self, token: Any, voter: Any, clicked: Any) -> None:
        """Record ``voter``'s choice on pair ``token``: left, right, tie or skip."""
        voter = check_voter(voter)
        if not isinstance(token, str) or not isinstance(clicked, str):
            raise VoteError(400, "a vote is {token, voter, choice} with strings")
        if clicked not in CHOICES:
            raise VoteError(400, f"choice must be one of {', '.join(CHOICES)}")
        with self._write() as db:
            row = db.execute("SELECT voter, item, run_a, run_b, a_side FROM shown WHERE token = ?",
                             (token,)).fetchone()  # fmt: skip
            if row is None or row[1] not in self.items:
                raise VoteError(404, "no such pair")
            who, item_key, a, b, a_side = row
            if who != voter:
                raise VoteError(403, "this pair was shown to another voter")
            if db.execute("SELECT 1 FROM votes WHERE token = ?", (token,)).fetchone():
                raise VoteError(409, "this pair is already voted")
            if clicked in ("tie", "skip"):
                choice = clicked
            else:
                choice = "a" if clicked == a_side else "b"
            item = self.items[item_key]
            db.execute(
                "INSERT INTO votes (token, voter, item, prompt, seed, image_of_prompt, category, "
                "run_a, run_b, a_side, clicked, choice, time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token, voter, item_key, item.prompt, item.seed, item.image_of_prompt,
                 item.category, a, b, a_side, clicked, choice, time.time()),
            )  # fmt: skip


def read_votes(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every vote (skips included) and the study's runs (name -> folder), read-only."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"--votes {path} does not exist")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM votes ORDER BY id")]
            runs = dict(db.execute("SELECT run, folder FROM study").fetchall())
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise StudyError(f"--votes {path}: not a votes database from compare serve ({e})") from e
    return rows, runs
