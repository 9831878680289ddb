"""A contract server for Kubeflow Model Registry's REST API: NOT the real Model Registry (no database, no
ML Metadata store, nothing kept after it stops), only the endpoints the `model-registry` Python client
(0.3.18, pinned in pkg/model_exporter/requirements.txt) calls to register a model, answered in the shapes
of the Model Registry OpenAPI spec (`api/openapi/model-registry.yaml` of kubeflow/hub, API version `v1`, the
one that client is generated from; paths under /api/model_registry/v1):

    GET  /registered_models?pageSize=N          RegisteredModelList (the client's connection check)
    GET  /registered_model?name=N               RegisteredModel, or 404 Error
    POST /registered_models                     RegisteredModelCreate -> 201 RegisteredModel (409 on a name)
    GET  /model_version?name=V&parentResourceId=ID    ModelVersion, or 404
    POST /model_versions                        ModelVersionCreate -> 201 ModelVersion (409 on a name)
    GET  /model_versions/{id}/artifacts         ArtifactList
    GET  /model_artifact?name=N&parentResourceId=ID   ModelArtifact, or 404
    POST /model_versions/{id}/artifacts         Artifact (artifactType model-artifact) -> 201 Artifact

Ids are strings of digits, times are milliseconds since the epoch as strings, as the spec says. Every
request needs `Authorization: Bearer TOKEN` when a token is set (401 otherwise). `fail` makes the next N
requests answer 503. `store` holds what was registered, for tests to read.

    from tests.support.model_registry_server import ModelRegistryServer
    with ModelRegistryServer(token="t").start() as registry:
        registry.endpoint, registry.store["registered_models"]
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.background import BackgroundServer

BASE = "/api/model_registry/v1"


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int


class ModelRegistryServer(BackgroundServer):
    def __init__(self, token: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.token = token
        self.fail = 0
        self.store: dict[str, list[dict[str, Any]]] = {
            "registered_models": [],
            "model_versions": [],
            "artifacts": [],
        }
        self._ids = itertools.count(1)
        super().__init__(type("Handler", (_Handler,), {"registry": self}), host, port, "model-registry")

    def new(self, kind: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        item = {**body, **extra, "id": str(next(self._ids))}
        item.update(createTimeSinceEpoch=now, lastUpdateTimeSinceEpoch=now)
        with self._lock:
            self.store[kind].append(item)
        return item

    def find(self, kind: str, **match: str) -> dict[str, Any] | None:
        with self._lock:
            return next(
                (i for i in self.store[kind] if all(str(i.get(k)) == v for k, v in match.items())), None
            )


class _Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Handler(BaseHTTPRequestHandler):
    registry: ModelRegistryServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        status = 500
        try:
            body = self._body()
            if self.registry.fail > 0:
                self.registry.fail -= 1
                raise _Error(503, "service unavailable (injected)")
            if self.registry.token and self.headers.get("Authorization") != f"Bearer {self.registry.token}":
                raise _Error(401, "unauthorized")
            if not url.path.startswith(BASE + "/"):
                raise _Error(404, "not found")
            status, answer = self._route(url.path[len(BASE) :], parse_qs(url.query), body)
        except _Error as exc:
            status, answer = exc.status, {"code": str(exc.status), "message": exc.message}
        except ValueError as exc:
            status, answer = 400, {"code": "400", "message": f"bad request: {exc}"}
        self.registry.log(LoggedRequest(self.command, url.path, status))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else {}

    def _route(self, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
        one = {k: v[0] for k, v in query.items()}
        r = self.registry
        if self.command == "GET" and path == "/registered_models":
            items = r.store["registered_models"][: int(one.get("pageSize", "100"))]
            return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
        if self.command == "GET" and path == "/registered_model":
            return 200, self._found(r.find("registered_models", name=one.get("name", "")))
        if self.command == "POST" and path == "/registered_models":
            _require(body, "name")
            if r.find("registered_models", name=body["name"]):
                raise _Error(409, f"registered model {body['name']!r} exists")
            return 201, r.new("registered_models", body, state=body.get("state", "LIVE"))
        if self.command == "GET" and path == "/model_version":
            match = {"name": one.get("name", ""), "registeredModelId": one.get("parentResourceId", "")}
            return 200, self._found(r.find("model_versions", **match))
        if self.command == "POST" and path == "/model_versions":
            _require(body, "name", "registeredModelId")
            if not r.find("registered_models", id=body["registeredModelId"]):
                raise _Error(404, f"no registered model {body['registeredModelId']}")
            if r.find("model_versions", name=body["name"], registeredModelId=body["registeredModelId"]):
                raise _Error(409, f"model version {body['name']!r} exists")
            return 201, r.new("model_versions", body, state=body.get("state", "LIVE"))
        if self.command == "GET" and path == "/model_artifact":
            match = {"name": one.get("name", ""), "_version": one.get("parentResourceId", "")}
            return 200, self._found(r.find("artifacts", **match))
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "model_versions" and parts[2] == "artifacts":
            if not r.find("model_versions", id=parts[1]):
                raise _Error(404, f"no model version {parts[1]}")
            if self.command == "GET":
                with r._lock:
                    items = [_public(a) for a in r.store["artifacts"] if a["_version"] == parts[1]]
                return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
            _require(body, "artifactType", "uri")
            if body["artifactType"] != "model-artifact":
                raise _Error(
                    400, f"artifactType {body['artifactType']!r} is not handled by this contract server"
                )
            return 201, _public(r.new("artifacts", body, _version=parts[1], state=body.get("state", "LIVE")))
        raise _Error(404, f"{self.command} {path} is not implemented by this contract server")

    @staticmethod
    def _found(item: dict[str, Any] | None) -> dict[str, Any]:
        if item is None:
            raise _Error(404, "not found")
        return _public(item)


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """Without the server's own bookkeeping (keys starting with _)."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _require(body: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if not body.get(n)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
