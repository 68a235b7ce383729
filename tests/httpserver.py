"""A small HTTP file server on 127.0.0.1 for download tests.

Serves in-memory files at a random port, with or without Range support, and
can misbehave on request: answer with a status, or send a Content-Length and
close the connection early. It records every request and the body bytes it
sent, so tests can assert "range requests were used" and "far fewer bytes than
the archive crossed the wire".
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class Behaviour:
    ranges: bool = True  # honour Range (single ranges, suffix ranges included)
    suffix_ranges: bool = True  # honour "bytes=-N"; some servers only do explicit ranges
    statuses: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses for its next GETs
    drops: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes to send before closing, per GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never hang a test's teardown on a client that stopped reading

    def handle_error(self, request, client_address) -> None:
        import sys

        # A client closing a connection it no longer wants (an abandoned whole-file answer) is expected here.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class FileServer:
    def __init__(self, files: dict[str, bytes], behaviour: Behaviour | None = None) -> None:
        self.files = dict(files)
        self.behaviour = behaviour or Behaviour()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> "FileServer":
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    # --- what happened ------------------------------------------------------
    def requests_for(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == "/" + path.lstrip("/")]

    def bytes_sent(self, path: str) -> int:
        return sum(s.sent for s in self.requests_for(path))

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: FileServer
    timeout = 10  # a stuck client cannot hold a server thread forever

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner = self.server_owner
        b = owner.behaviour
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        with owner._lock:
            status_queue = b.statuses.get(path)
            forced = status_queue.pop(0) if (status_queue and not head) else None
            drop_queue = b.drops.get(path)
            drop = drop_queue.pop(0) if (drop_queue and not head) else None
        body = owner.files.get(path.lstrip("/"))
        if forced is not None or body is None:
            status = forced or 404
            msg = f"status {status}\n".encode()
            owner._record(Seen(self.command, path, rng, status, 0 if head else len(msg)))
            self.send_response(status)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if not head:
                self.wfile.write(msg)
            return

        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        start, end, status = 0, len(body) - 1, 200
        if rng and b.ranges and self.headers.get("If-Range", etag) == etag:
            parsed = _parse_range(rng, len(body), b.suffix_ranges)
            if parsed == "unsatisfiable":
                owner._record(Seen(self.command, path, rng, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        chunk = body[start : end + 1]
        payload = b"" if head else (chunk if drop is None else chunk[:drop])
        # Recorded before sending: the client may have read everything before this thread runs again.
        seen = Seen(self.command, path, rng, status, len(payload))
        owner._record(seen)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("ETag", etag)
        if b.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
        self.end_headers()
        if not head:
            try:
                self.wfile.write(payload)
                self.wfile.flush()
            except OSError:  # the client went away (e.g. it rejected a whole-file answer): count nothing
                with owner._lock:
                    seen.sent = 0
                self.close_connection = True
            if drop is not None:
                self.close_connection = True


def _parse_range(header: str, size: int, suffix_ok: bool) -> tuple[int, int] | str | None:
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # not a single byte range: ignore it, as RFC 9110 allows
    first, last = m.group(1), m.group(2)
    if not first:
        if not suffix_ok:
            return None
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    a = int(first)
    if a >= size:
        return "unsatisfiable"
    b = min(int(last), size - 1) if last else size - 1
    if b < a:
        return None
    return a, b
