"""A threaded HTTP server on 127.0.0.1 for the fake backends: each fake gives one function
that handles a request (GET and POST alike); this owns the sockets and the thread."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class LoopbackServer:
    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None],
                 on_connect: Callable[[], None] | None = None):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real APIs: connection reuse can be counted

            def setup(self):
                super().setup()
                if on_connect is not None:
                    on_connect()

            def log_message(self, *args):
                pass

            def do_GET(self):
                handle(self)

            def do_POST(self):
                handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def send(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    """One whole answer, with its length (the connection is kept alive)."""
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
