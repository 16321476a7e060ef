"""The voting page in a real browser: headless Chromium (Debian's ``chromium``; ``.ci/run``
installs it) driven by Playwright, against ``python -m sdxl_jax.compare serve`` started as its
own process on a free loopback port. A screenshot of the page is kept in
``$SDXL_TEST_ARTIFACTS`` (default ``test-artifacts/``)."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.compare.fixtures import PROMPTS, run_of, write_run

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SDXL_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root, in a sandbox with no network: no setuid sandbox, no calls home.
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's chromium package (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Server:
    """``compare serve`` in its own process; ``kill()`` is SIGKILL, ``start()`` again resumes."""

    def __init__(self, tmp_path: Path):
        self.runs = {n: write_run(tmp_path / n, n) for n in ("a", "b")}
        self.votes = tmp_path / "votes.sqlite"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sdxl_jax.compare", "serve", "--a", str(self.runs["a"]),
             "--b", str(self.runs["b"]), "--votes", str(self.votes), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        assert line.startswith("voting page: http://127.0.0.1:"), line + self.proc.stderr.read()
        self.url = line.split()[2]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])
        return self.url

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def rows(self) -> list[tuple]:
        db = sqlite3.connect(self.votes)
        try:
            return db.execute("SELECT voter, clicked, choice FROM votes ORDER BY id").fetchall()
        finally:
            db.close()


@pytest.fixture()
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.proc.terminate()
        s.proc.wait(10)


def voted(page, n: int) -> None:
    """Wait until the page counts ``n`` votes."""
    from playwright.sync_api import expect

    expect(page.locator("#progress")).to_have_text(f"{n} / {len(PROMPTS)} voted")


def shown_runs(page) -> tuple[str, str]:
    """Which run the browser shows on each side (by the images' pixels, fetched by their URL)."""
    out = []
    for side in ("#left", "#right"):
        src = page.eval_on_selector(side, "img => img.src")
        with urllib.request.urlopen(src, timeout=10) as r:
            out.append(run_of(r.read()))
    return out[0], out[1]


def test_voting_in_the_browser(browser, server):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    page.goto(server.url)
    page.fill("#name", "ann")
    page.keyboard.press("Enter")
    page.wait_for_selector("#study:not(.hidden)")
    assert page.text_content("#progress") == f"0 / {len(PROMPTS)} voted"
    assert page.text_content("#prompt") in {p for p, _ in PROMPTS}
    page.wait_for_load_state("networkidle")  # the images are in
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "compare_page.png"))
    # nothing on the page says which run is which
    html = page.content()
    assert all(str(f) not in html for f in server.runs.values()) and "secret" not in html

    expected = []
    left, right = shown_runs(page)
    page.click("#b-left")  # a click
    expected.append(("ann", "left", left))
    voted(page, 1)
    left, right = shown_runs(page)
    page.keyboard.press("ArrowRight")  # a key
    expected.append(("ann", "right", right))
    voted(page, 2)
    assert server.rows() == expected

    # A reload resumes: the same voter, the same pair, the same count.
    before = page.eval_on_selector("#left", "img => img.src")
    page.reload()
    page.wait_for_selector("#study:not(.hidden)")
    assert page.eval_on_selector("#left", "img => img.src") == before
    assert page.text_content("#progress") == f"2 / {len(PROMPTS)} voted"

    # A server killed between votes loses none; the page goes on once it is back.
    left, right = shown_runs(page)
    server.kill()
    assert server.rows() == expected
    server.start()
    page.keyboard.press("t")
    expected.append(("ann", "tie", "tie"))
    voted(page, 3)
    page.click("#b-skip")
    expected.append(("ann", "skip", "skip"))
    page.wait_for_selector("#done:not(.hidden)")
    assert page.text_content("#progress") == f"{len(PROMPTS)} / {len(PROMPTS)} voted"
    assert server.rows() == expected
    page.close()


def test_two_browsers_vote_at_once(browser, server):
    pages = [browser.new_context().new_page() for _ in range(2)]
    for name, page in zip(("ann", "bob"), pages, strict=True):
        page.goto(server.url)
        page.fill("#name", name)
        page.keyboard.press("Enter")
        page.wait_for_selector("#study:not(.hidden)")
    for k in range(len(PROMPTS)):
        for page in pages:
            page.keyboard.press("ArrowLeft")
        for page in pages:
            voted(page, k + 1)
    for page in pages:
        page.wait_for_selector("#done:not(.hidden)")
    rows = server.rows()
    assert sorted(r[0] for r in rows) == ["ann"] * len(PROMPTS) + ["bob"] * len(PROMPTS)
