"""A tiny HTTP file server for tests: serves in-memory files, honours ``Range`` and records what it got.

``http.server.SimpleHTTPRequestHandler`` ignores ``Range``, so resumable downloads need this one.
Use as a context manager; it listens on 127.0.0.1 at a free port and stops on exit.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FileServer:
    """Serves ``files[name]`` at ``/name``; ``ranges`` records each request's Range header (or None)."""

    def __init__(self, honour_range: bool = True) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.honour_range = honour_range
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                header = self.headers.get("Range")
                server.ranges.append(header)
                data = server.files.get(self.path.lstrip("/").split("?")[0])
                if data is None:
                    return self._reply(404, b"not found")
                match = RANGE.match(header or "") if server.honour_range else None
                if match is None:
                    return self._reply(200, data)
                start = int(match[1])
                end = int(match[2]) if match[2] else len(data) - 1
                if start >= len(data) or end < start:
                    return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                end = min(end, len(data) - 1)
                self._reply(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{len(data)}"})

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        return Handler
