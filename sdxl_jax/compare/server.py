"""The voting page and its small JSON API, on the standard library's threading HTTP server.

Routes (anything else is 404, a method other than GET/POST 405):

- ``GET /``: the page (``page.html``);
- ``GET /api/next?voter=NAME``: ``{"pair": {"token", "prompt", "left", "right"} | null,
  "progress": {"done", "total"}}``;
- ``POST /api/vote`` with ``{"token", "voter", "choice": left|right|tie|skip}``: records it and
  answers like ``/api/next`` with the next pair;
- ``GET /img/TOKEN/left|right``: that image, its PNG text chunks removed (they name the
  checkpoint).

What reaches the browser names no run and no file: pairs are random tokens, images are
addressed by token and side, the left/right order is drawn per pair and kept on the server.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sdxl_jax.compare.votes import VoteError, VoteStore

MAX_BODY = 4096  # bytes of a vote request
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks that make up the picture; text (tEXt/zTXt/iTXt), time and EXIF chunks are dropped.
PNG_KEEP = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP",
            b"sBIT"}  # fmt: skip
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src 'self'",
}


def png_pixels_only(data: bytes) -> bytes:
    """``data`` (a PNG) without its ancillary chunks apart from colour information."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    out, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        if kind in PNG_KEEP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)
    raise ValueError("PNG without IEND")


class Handler(BaseHTTPRequestHandler):
    store: VoteStore  # set on the class made by make_server
    page: bytes
    server_version = "sdxl_jax-compare"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # quiet terminal
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _answer(self, voter: str) -> None:
        pair = self.store.next_pair(voter)
        if pair is not None:
            pair["left"] = f"/img/{pair['token']}/left"
            pair["right"] = f"/img/{pair['token']}/right"
        self._json(200, {"pair": pair, "progress": self.store.progress(voter)})

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.split("/")
        try:
            if url.path in ("/", "/index.html"):
                self._send(200, self.page, "text/html; charset=utf-8")
            elif url.path == "/api/next":
                self._answer(parse_qs(url.query).get("voter", [""])[0])
            elif len(parts) == 4 and parts[1] == "img":
                path = self.store.image(parts[2], parts[3])
                self._send(200, png_pixels_only(path.read_bytes()), "image/png")
            else:
                self._error(404, "not found")
        except VoteError as e:
            self._error(e.status, str(e))
        except (OSError, ValueError) as e:  # an image file gone or damaged since start-up
            self._error(500, f"cannot read that image ({e})")

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/api/vote":
            return self._error(404, "not found")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "a vote needs Content-Length")
        if not 0 < length <= MAX_BODY:
            return self._error(413 if length > 0 else 400, "a vote is a small JSON object")
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._error(400, 'malformed vote: send {"token", "voter", "choice"} as JSON')
        try:
            self.store.vote(body.get("token"), body.get("voter"), body.get("choice"))
            self._answer(body["voter"])
        except VoteError as e:
            self._error(e.status, str(e))

    def _not_allowed(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


def make_server(store: VoteStore, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A server (not yet serving) for ``store``; port 0 picks a free one."""
    page = resources.files("sdxl_jax.compare").joinpath("page.html").read_bytes()
    handler = type("StudyHandler", (Handler,), {"store": store, "page": page})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(store: VoteStore, host: str, port: int, *, out: Any = sys.stdout) -> None:
    """Serve until interrupted, after one line with the address."""
    server = make_server(store, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"voting page: http://{shown}:{server.server_address[1]}/  (Ctrl-C stops; votes are "
          f"saved as they come in {store.path})", file=out, flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(store: VoteStore, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """A server on a free port in a daemon thread, and its base URL (for notebooks and tests)."""
    server = make_server(store, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS
