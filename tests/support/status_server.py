"""A TrainJob status server for tests: what Kubeflow Trainer's pkg/statusserver does, over real HTTPS.

    ca, cert, key = make_certificates(tmp_path)
    with StatusServer(token_file).serve_tls(cert, key).start() as server:
        env = server.env(ca, token_file, "default", "my-job")   # the three variables the controller injects
        ...; server.payloads                                     # every accepted JSON body

Like the real one it takes `POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status`
with `Authorization: Bearer <token>` (here: the token file's content at the time of the request, so a rotated
token is checked as the kubelet would rotate it), bodies up to 64 KiB, and answers errors with a Kubernetes
Status object. `mode` makes it hostile: "hang" (never answers in time), "500", "403".
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.support.background import BackgroundServer

PATH = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs/([^/]+)/status$")
MAX_BODY = 1 << 16


class StatusServer(BackgroundServer):
    def __init__(self, token_file: Path, mode: str = "ok", hang_s: float = 30.0) -> None:
        self.token_file, self.mode, self.hang_s = token_file, mode, hang_s
        self.payloads: list[dict[str, Any]] = []  # accepted bodies, in order
        self.tokens: list[str] = []  # the bearer token of each accepted request
        self.attempts = 0  # every POST, accepted or not
        self.released = threading.Event()  # set to let hung requests go
        super().__init__(type("Handler", (_Handler,), {"server_of": self}), "127.0.0.1", 0, "status-server")

    def env(self, ca: Path, namespace: str = "default", name: str = "job") -> dict[str, str]:
        return {
            "KUBEFLOW_TRAINER_SERVER_URL": f"{self.endpoint}/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
            f"{namespace}/trainjobs/{name}/status",
            "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(ca),
            "KUBEFLOW_TRAINER_SERVER_TOKEN": str(self.token_file),
        }

    def stop(self) -> None:
        self.released.set()
        super().stop()


def status(code: int, message: str) -> bytes:
    return json.dumps(
        {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    server_of: StatusServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(404, status(404, "Not found"))

    def do_POST(self) -> None:
        server = self.server_of
        with server._lock:
            server.attempts += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, status(413, "Request body too large"))
            return
        body = self.rfile.read(length)
        if server.mode == "hang":
            server.released.wait(server.hang_s)
            time.sleep(0.1)
            return
        if server.mode == "500":
            self._reply(500, status(500, "Internal error"))
            return
        if not PATH.match(self.path):
            self._reply(404, status(404, "Not found"))
            return
        expected = f"Bearer {server.token_file.read_text().strip()}"
        if server.mode == "403" or self.headers.get("Authorization") != expected:
            self._reply(403, status(403, "Forbidden"))
            return
        try:
            payload = json.loads(body)
        except ValueError:
            self._reply(422, status(422, "Invalid payload"))
            return
        with server._lock:
            server.payloads.append(payload)
            server.tokens.append(expected.removeprefix("Bearer "))
        self._reply(200, json.dumps(payload).encode())
