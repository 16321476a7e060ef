"""The study server over real HTTP on loopback (the browser tests drive the page itself):
blind pairs, votes recorded as the run they favour, bad requests refused without a trace."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sdxl_jax.compare import server as server_lib
from sdxl_jax.compare.runs import StudyError, load_study
from sdxl_jax.compare.votes import VoteStore
from tests.compare.fixtures import PROMPTS, run_of, write_run


@pytest.fixture()
def study(tmp_path):
    runs = {n: write_run(tmp_path / n, n) for n in ("a", "b")}
    store = VoteStore(tmp_path / "votes.sqlite", load_study(runs))
    srv, url = server_lib.serve_in_thread(store)
    yield store, url, tmp_path
    srv.shutdown()
    srv.server_close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/api/vote", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def next_pair(url: str, voter: str) -> dict:
    status, body = get(f"{url}/api/next?voter={voter}")
    assert status == 200, body
    return json.loads(body)


def votes(store: VoteStore) -> list[tuple]:
    db = sqlite3.connect(store.path)
    try:
        return db.execute("SELECT voter, item, a_side, clicked, choice FROM votes").fetchall()
    finally:
        db.close()


def test_votes_record_the_run_chosen_whatever_side_it_was_shown_on(study):
    store, url, _ = study
    sides, chosen = [], []
    while (pair := next_pair(url, "ann")["pair"]) is not None:
        left = run_of(get(url + pair["left"])[1])
        right = run_of(get(url + pair["right"])[1])
        assert {left, right} == {"a", "b"}
        sides.append(left)
        status, answer = post(url, {"token": pair["token"], "voter": "ann", "choice": "right"})
        assert status == 200, answer
        chosen.append(right)
    assert len(chosen) == len(PROMPTS)  # every item once, the repeated prompt included
    assert answer["progress"] == {"done": len(PROMPTS), "total": len(PROMPTS)}
    assert [v[4] for v in votes(store)] == chosen  # 'a' / 'b': the run whose image was right
    assert [v[2] for v in votes(store)] == ["left" if s == "a" else "right" for s in sides]


def test_left_right_order_is_drawn_per_pair(tmp_path):
    many = [(f"prompt {i}", None) for i in range(60)]
    runs = {n: write_run(tmp_path / n, n, prompts=many) for n in ("a", "b")}
    store = VoteStore(tmp_path / "v.sqlite", load_study(runs))
    sides = []
    for _ in range(60):
        pair = store.next_pair("bob")
        sides.append(store.image(pair["token"], "left").parent.name)
        store.vote(pair["token"], "bob", "tie")
    assert 15 <= sides.count("a") <= 45  # P(outside) < 1e-4 for a fair coin


def test_nothing_in_the_page_api_or_images_names_a_run(study):
    store, url, tmp_path = study
    seen = get(url + "/")[1] + json.dumps(next_pair(url, "ann")).encode()
    pair = next_pair(url, "ann")["pair"]
    png = get(url + pair["left"])[1]
    for secret in (b"secret-checkpoint", str(tmp_path).encode(), b'"a"', b"run_a", b"00000"):
        assert secret not in seen + png
    # The image is the same picture, without the PNG text chunks sample writes.
    original = store.image(pair["token"], "left")
    assert b"sdxl_jax" in original.read_bytes() and b"tEXt" not in png
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                  np.asarray(Image.open(original)))  # fmt: skip


def test_bad_requests_get_4xx_and_change_nothing(study):
    store, url, _ = study
    pair = next_pair(url, "ann")["pair"]
    assert post(url, {"token": pair["token"], "voter": "ann", "choice": "left"})[0] == 200
    pair = next_pair(url, "ann")["pair"]
    before = votes(store)
    token = pair["token"]
    for body, status in [
        ({"token": "no-such-pair", "voter": "ann", "choice": "left"}, 404),
        (b"{not json", 400),
        (b"[1, 2]", 400),
        ({"token": token, "voter": "ann", "choice": "both"}, 400),
        ({"token": token, "voter": "", "choice": "left"}, 400),
        ({"token": 7, "voter": "ann", "choice": "left"}, 400),
        ({"token": token, "voter": "eve", "choice": "left"}, 403),  # shown to ann
    ]:
        assert post(url, body)[0] == status, body
    for path in ["/img/../../etc/passwd", f"/img/{token}/../../manifest.json",
                 f"/img/{token}/middle", "/img/unknown/left", "/../a/00000.png", "/a/00000.png",
                 "/manifest.json", "/api/votes", "/%2e%2e/etc/passwd"]:  # fmt: skip
        assert get(url + path)[0] == 404, path
    assert votes(store) == before
    assert post(url, {"token": token, "voter": "ann", "choice": "tie"})[0] == 200
    again = post(url, {"token": token, "voter": "ann", "choice": "left"})
    assert again[0] == 409 and len(votes(store)) == len(before) + 1


def test_a_voter_sees_only_their_own_progress(study):
    store, url, _ = study
    for _ in range(3):
        pair = next_pair(url, "ann")["pair"]
        post(url, {"token": pair["token"], "voter": "ann", "choice": "left"})
    assert next_pair(url, "bob")["progress"] == {"done": 0, "total": len(PROMPTS)}
    assert next_pair(url, "ann")["progress"] == {"done": 3, "total": len(PROMPTS)}


def test_voters_at_once_are_all_recorded(study):
    store, url, _ = study
    errors = []

    def voter(name: str) -> None:
        while (pair := next_pair(url, name)["pair"]) is not None:
            status, body = post(url, {"token": pair["token"], "voter": name, "choice": "left"})
            if status != 200:
                errors.append(body)

    threads = [threading.Thread(target=voter, args=(f"v{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = votes(store)
    assert len(rows) == 6 * len(PROMPTS)
    assert len({(v, item) for v, item, *_ in rows}) == len(rows)  # nobody judged a pair twice


def test_several_voters_get_the_least_voted_pairs_first(tmp_path):
    runs = {n: write_run(tmp_path / n, n) for n in ("a", "b")}
    store = VoteStore(tmp_path / "v.sqlite", load_study(runs))
    for voter in ("ann", "bob"):
        for _ in range(2):
            pair = store.next_pair(voter)
            store.vote(pair["token"], voter, "left")
    # ann and bob covered the four items between them before anyone saw one twice
    assert len({row[1] for row in votes(store)}) == 4


def test_a_votes_file_is_not_reused_for_other_runs(tmp_path):
    runs = {n: write_run(tmp_path / n, n) for n in ("a", "b", "c")}
    VoteStore(tmp_path / "v.sqlite", load_study({"a": runs["a"], "b": runs["b"]}))
    with pytest.raises(StudyError, match="holds votes for other runs"):
        VoteStore(tmp_path / "v.sqlite", load_study({"a": runs["a"], "b": runs["c"]}))
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 40)
    with pytest.raises(StudyError, match="not a votes database"):
        VoteStore(tmp_path / "junk.sqlite", load_study({"a": runs["a"], "b": runs["b"]}))


def test_four_runs_pair_every_two(tmp_path):
    runs = {n: write_run(tmp_path / n, n, prompts=PROMPTS[:2]) for n in ("a", "b", "c", "d")}
    store = VoteStore(tmp_path / "v.sqlite", load_study(runs))
    shown = set()
    while (pair := store.next_pair("ann")) is not None:
        shown.add(frozenset(store.image(pair["token"], s).parent.name for s in ("left", "right")))
        store.vote(pair["token"], "ann", "skip")
    assert len(shown) == 6 and store.progress("ann") == {"done": 12, "total": 12}


def test_png_filter_keeps_pixels_and_refuses_what_is_not_png():
    buf = io.BytesIO()
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("parameters", "checkpoint: secret")
    img = np.random.default_rng(0).integers(0, 255, (9, 7, 3), np.uint8)
    Image.fromarray(img).save(buf, format="PNG", pnginfo=info)
    out = server_lib.png_pixels_only(buf.getvalue())
    assert b"secret" not in out
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(out))), img)
    for bad in (b"GIF89a....", buf.getvalue()[:40]):
        with pytest.raises(ValueError):
            server_lib.png_pixels_only(bad)


def test_listening_beyond_this_machine_warns(tmp_path):
    import subprocess
    import sys

    runs = {n: write_run(tmp_path / n, n) for n in ("a", "b")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_jax.compare", "serve", "--a", str(runs["a"]), "--b",
         str(runs["b"]), "--votes", str(tmp_path / "v.sqlite"), "--host", "0.0.0.0",
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("voting page: http://0.0.0.0:"), line
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "warning: --host 0.0.0.0 lets anyone who reaches this machine vote" in err
    assert "4 matched images x 1 pair of runs = 4 votes per voter" in err
