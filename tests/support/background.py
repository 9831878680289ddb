"""What the Hub server and the fault proxy share: an HTTP server on a background thread, and a request log."""

from __future__ import annotations

import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class BackgroundServer:
    """A ThreadingHTTPServer run by `start()` on a daemon thread; `endpoint` is its base URL."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, port: int, name: str):
        self.requests: list[Any] = []  # records with at least .method and .path
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        shown = "127.0.0.1" if host == "0.0.0.0" else host
        self.endpoint = f"http://{shown}:{self.httpd.server_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)

    def serve_tls(self, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> Self:
        """Speak HTTPS with this certificate (call before `start`); `endpoint` becomes https://."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.endpoint = self.endpoint.replace("http://", "https://", 1)
        return self

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, contains: str = "", method: str = "GET") -> int:
        """How many `method` requests had `contains` in their (unquoted) path."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and contains in r.path)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def log(self, entry: Any) -> None:
        with self._lock:
            self.requests.append(entry)

    def log_snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r.__dict__) for r in self.requests]
