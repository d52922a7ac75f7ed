"""One HTML page served on its own origin (Python's http.server in a thread): a page of an
integrator's site, for the browser benchmark's plain client and the client-module tests."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StaticPage:
    """Serves `html` for every GET on 127.0.0.1:`port` until `close()`; `url` is its origin."""

    def __init__(self, port: int, html: str) -> None:
        body = html.encode()

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.url = f"http://127.0.0.1:{port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Page)
        self._thread = threading.Thread(target=self._server.serve_forever, name="static-page", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(5)

    def __enter__(self) -> "StaticPage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
