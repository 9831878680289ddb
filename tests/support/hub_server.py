"""A small Hugging Face Hub-compatible HTTP server, serving repos from a folder, for tests, demos and benches.

It speaks the endpoints `huggingface_hub` (HfApi, hf_hub_download, snapshot_download) calls for model and
dataset repos: repo info (`/api/{models,datasets}/ORG/NAME[/revision/REV]`), the tree listing with LFS
SHA-256s and pagination (`/api/.../tree/REV[/PATH]`), and `resolve` (HEAD and GET, Range requests) at
`/ORG/NAME/resolve/REV/PATH` and `/datasets/ORG/NAME/resolve/REV/PATH`. Errors look like the Hub's: 401
with `X-Error-Code: RepoNotFound` for a missing or private repo without a token, 404 `RevisionNotFound`,
404 `EntryNotFound`, 401 "Invalid credentials in Authorization header" for a wrong token.

Folder layout (one sub-folder per branch or tag; `main` is the default branch):

    ROOT/models/ORG/NAME/main/config.json
    ROOT/datasets/ORG/NAME/v1.0/data/train.jsonl
    ROOT/models/ORG/NAME/.private          # optional: the repo needs the token (401 RepoNotFound without)
    ROOT/models/ORG/NAME/.gated            # optional: gated; without the token 401 GatedRepo

Files of LFS_SUFFIXES types or >= --lfs-threshold bytes are served as LFS files (tree entry with sha256).
With `lfs_redirect` set to a base URL (another host name for this server, like the Hub's CDN), `resolve` of
an LFS file answers 302 to `BASE/cdn/...`, which serves the bytes without a token and, as a presigned URL
does, refuses any request that carries an Authorization header (400).
Commit ids are deterministic (sha1 of type, repo and revision), and a commit id works as a revision.
`range_mode` makes `resolve` mishandle Range as some servers and mirrors do: "ignore" answers 200 with the
whole file (RFC 9110 allows it), "bare" answers 200 with just the range and no Content-Range, "shift"
answers 206 with the range one byte further on, its Content-Range saying so.

CLI (prints one JSON line {"endpoint": ...} once ready; point HF_ENDPOINT at it):

    python -m tests.support.hub_server --root DIR [--port 0] [--host 127.0.0.1] [--token T]
        [--private ORG/NAME]

Python:

    from tests.support.hub_server import start_hub_server
    with start_hub_server(tmp_path, token="hf_secret") as hub:
        hub.add_repo("org/tiny", {"config.json": b"{}"}, repo_type="model", revision="main", private=True)
        hub.endpoint, hub.count("/resolve/"), hub.requests

Uploads (what huggingface_hub's `create_repo`, `create_branch` and `create_commit` call, with Xet off):
`POST /api/repos/create` (409 when it exists), `POST /api/validate-yaml`, `POST .../branch/B`,
`POST /api/models/ORG/NAME/preupload/REV` (LFS_SUFFIXES or >= lfs_threshold bytes: "lfs", with the id
of the file the revision holds, so unchanged files are left out), `POST /ORG/NAME.git/info/lfs/objects/batch`
(basic transfer; no actions for an object the store has), `PUT /_lfs/OID` (the body's SHA-256 and size are
checked), `POST /_lfs/verify`, and `POST /api/models/ORG/NAME/commit/REV` (ndjson: header, file, lfsFile),
applied to the revision's folder all at once, only once every LFS object is in the store. Each write needs
the token. `commits` lists what was committed; `fail_commits` makes the next N commits answer 500.

`GET /_admin/requests` returns the request log as JSON, `POST /_admin/reset` clears it (other processes).
For faults (5xx, 429 + Retry-After, dropped connections, stalls) put tests.support.fault_proxy in front.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.background import BackgroundServer

LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".h5",
    ".msgpack",
    ".parquet",
    ".arrow",
    ".gguf",
    ".onnx",
)
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
PAGE_SIZE = 1000
_API = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/]+)(?:/(.*))?$")
_CDN = re.compile(r"^/cdn/(model|dataset)/([^/]+)/([^/]+)/([0-9a-f]{40})/(.+)$")
_WRITE = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/]+)/(branch|preupload|commit)/(.+)$")
_RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str  # unquoted URL path
    range: str | None
    status: int
    authorized: bool


class HubServer(BackgroundServer):
    """A running server; `endpoint` is its base URL. Thread-safe request log in `requests`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        token: str | None = None,
        private: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        page_size: int = PAGE_SIZE,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.private = set(private)
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        self.lfs_redirect: str | None = None  # base URL LFS resolves redirect to (see the module doc)
        self.range_mode = "honour"  # or "ignore", "bare", "shift" (see the module doc)
        self._hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
        self.commits: list[dict[str, Any]] = []  # {"repo", "revision", "oid", "files": [...]}
        self.fail_commits = 0
        super().__init__(type("Handler", (_Handler,), {"hub": self}), host, port, "hub-server")

    # -- content --------------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | str | os.PathLike[str]],
        repo_type: str = "model",
        revision: str = "main",
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Write `files` (path -> bytes, or a local file to copy) as `revision`; returns its commit id."""
        base = self.repo_dir(repo_id, repo_type) / quote(revision, safe="")  # refs/pr/1: one folder
        for rel, content in files.items():
            target = base / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                with open(content, "rb") as src, open(target, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
        if private:
            (self.repo_dir(repo_id, repo_type) / ".private").touch()
        if gated:
            (self.repo_dir(repo_id, repo_type) / ".gated").touch()
        return commit_id(repo_type, repo_id, revision)

    def is_private(self, repo_id: str, repo_type: str) -> bool:
        return repo_id in self.private or (self.repo_dir(repo_id, repo_type) / ".private").exists()

    def revisions(self, repo_id: str, repo_type: str) -> dict[str, str]:
        """commit id -> revision folder name."""
        base = self.repo_dir(repo_id, repo_type)
        if not base.is_dir():
            return {}
        return {commit_id(repo_type, repo_id, unquote(d.name)): d.name for d in base.iterdir() if d.is_dir()}

    def hashes(self, path: Path) -> tuple[str, str]:
        """(git blob sha1, sha256) of a file, cached by size and mtime."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        blob = hashlib.sha1(b"blob %d\0" % st.st_size)
        sha = hashlib.sha256()
        with open(path, "rb") as src:
            while block := src.read(1 << 22):
                blob.update(block)
                sha.update(block)
        value = (blob.hexdigest(), sha.hexdigest())
        with self._lock:
            self._hashes[key] = value
        return value

    def lfs_signature(self, oid: str) -> str:
        return hashlib.sha256(f"{self.token}:{oid}".encode()).hexdigest()[:32]

    def lfs_dir(self) -> Path:
        """Where uploaded LFS objects wait for a commit, named by their SHA-256."""
        folder = self.root / "_lfs"
        folder.mkdir(exist_ok=True)
        return folder

    def is_lfs(self, path: Path) -> bool:
        return path.suffix in LFS_SUFFIXES or path.stat().st_size >= self.lfs_threshold


def commit_id(repo_type: str, repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_type}/{repo_id}@{revision}".encode()).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_POST(self) -> None:
        if urlsplit(self.path).path == "/_admin/reset":
            self.hub.reset_log()
            self._json(200, {"ok": True})
        else:
            self._write()

    def do_PUT(self) -> None:
        self._write()

    # -- uploads --------------------------------------------------------------------------------------------
    def _write(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self._authorized = False
        self._pending = True
        try:
            if self.command == "PUT" and (m := re.fullmatch(r"/_lfs/([0-9a-f]{64})", path)):
                # Signed like a presigned URL (the Hub's LFS hrefs are): no Authorization header needed.
                if parse_qs(url.query).get("sig") != [self.hub.lfs_signature(m.group(1))]:
                    raise _HubError(403, None, "bad or missing signature")
                self._lfs_put(m.group(1))
                return
            self._authorized = self._auth()
            if not self._authorized:
                raise _HubError(401, None, "Invalid username or password.")
            body = self._body()
            if path == "/api/repos/create":
                self._create_repo(json.loads(body))
            elif path == "/api/validate-yaml":
                self._json(200, {"errors": [], "warnings": []})
            elif path == "/_lfs/verify":
                info = json.loads(body)
                stored = self.hub.lfs_dir() / str(info.get("oid"))
                if not stored.is_file() or stored.stat().st_size != info.get("size"):
                    raise _HubError(404, None, "object not found")
                self._json(200, {"ok": True})
            elif m := re.fullmatch(r"/([^/]+)/([^/]+)\.git/info/lfs/objects/batch", path):
                self._lfs_batch(json.loads(body))
            elif m := _WRITE.match(url.path):
                repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
                repo_type, action, revision = m.group(1)[:-1], m.group(4), unquote(m.group(5))
                if not self.hub.revisions(repo_id, repo_type):
                    raise _HubError(404, "RepoNotFound", "Repository not found")
                if action == "branch":
                    self._create_branch(repo_id, repo_type, revision, json.loads(body or b"{}"))
                elif action == "preupload":
                    self._preupload(repo_id, repo_type, revision, json.loads(body))
                else:
                    self._commit(repo_id, repo_type, revision, body)
            else:
                raise _HubError(405 if self.command == "PUT" else 404, None, "Not Found")
        except _HubError as exc:
            self._error(exc, head=False)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if self._pending:
                self._log(499)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _create_repo(self, info: dict[str, Any]) -> None:
        repo_type = info.get("type") or "model"
        repo_id = f"{info.get('organization')}/{info.get('name')}"
        if self.hub.revisions(repo_id, repo_type):  # the Hub's 409 names the repo's URL too
            url = f"{self.hub.endpoint}/{repo_id}"
            self._json(409, {"error": "You already created this model repo", "url": url})
            return
        (self.hub.repo_dir(repo_id, repo_type) / "main").mkdir(parents=True)
        self.hub.add_repo(repo_id, {}, repo_type=repo_type, private=info.get("visibility") != "public")
        self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo_id: str, repo_type: str, branch: str, info: dict[str, Any]) -> None:
        base = self.hub.repo_dir(repo_id, repo_type)
        target = base / quote(branch, safe="")
        if target.exists():
            raise _HubError(409, None, f"Reference {branch} already exists")
        shutil.copytree(base / quote(info.get("startingPoint") or "main", safe=""), target)
        self._json(200, {})

    def _revision_dir(self, repo_id: str, repo_type: str, revision: str) -> Path:
        folder = self.hub.repo_dir(repo_id, repo_type) / quote(revision, safe="")
        if not folder.is_dir():
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return folder

    def _preupload(self, repo_id: str, repo_type: str, revision: str, info: dict[str, Any]) -> None:
        folder = self._revision_dir(repo_id, repo_type, revision)
        files = []
        for f in info.get("files", []):
            name = str(f["path"])
            lfs = Path(name).suffix in LFS_SUFFIXES or int(f["size"]) >= self.hub.lfs_threshold
            existing = folder / name
            oid = None
            if existing.is_file():
                blob, sha = self.hub.hashes(existing)
                oid = sha if self.hub.is_lfs(existing) else blob
            files.append(
                {"path": name, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json(200, {"files": files, "commitOid": commit_id(repo_type, repo_id, revision)})

    def _lfs_batch(self, info: dict[str, Any]) -> None:
        if info.get("operation") != "upload" or "basic" not in info.get("transfers", ["basic"]):
            raise _HubError(422, None, "only basic uploads")
        objects = []
        for obj in info.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            stored = self.hub.lfs_dir() / oid
            if not (stored.is_file() and stored.stat().st_size == size):  # else: already there, no actions
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/_lfs/{oid}?sig={self.hub.lfs_signature(oid)}"},
                    "verify": {"href": f"{self.hub.endpoint}/_lfs/verify", "header": {}},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str) -> None:
        length = int(self.headers.get("Content-Length") or -1)
        if length < 0:
            raise _HubError(411, None, "Content-Length required")
        store = self.hub.lfs_dir()
        tmp = store / f".{oid}.{threading.get_ident()}.partial"
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            left = length
            while left > 0 and (block := self.rfile.read(min(left, 1 << 20))):
                digest.update(block)
                out.write(block)
                left -= len(block)
        if left or digest.hexdigest() != oid:
            tmp.unlink()
            raise _HubError(400, None, "the body does not match the object id or size")
        os.replace(tmp, store / oid)
        self._json(200, {})

    def _commit(self, repo_id: str, repo_type: str, revision: str, body: bytes) -> None:
        folder = self._revision_dir(repo_id, repo_type, revision)
        if self.hub.fail_commits > 0:
            self.hub.fail_commits -= 1
            raise _HubError(500, None, "Internal Error (injected)")
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        writes: dict[str, bytes | Path] = {}
        for item in items:
            value = item.get("value", {})
            if item.get("key") == "file":
                writes[value["path"]] = base64.b64decode(value["content"])
            elif item.get("key") == "lfsFile":
                stored = self.hub.lfs_dir() / value["oid"]
                if not stored.is_file() or stored.stat().st_size != value["size"]:
                    raise _HubError(
                        422, None, f"LFS object {value['oid']} of {value['path']} was not uploaded"
                    )
                writes[value["path"]] = stored
            elif item.get("key") != "header":
                raise _HubError(422, None, f"unsupported commit operation {item.get('key')!r}")
        for name, content in writes.items():  # every LFS object checked above: the commit applies whole
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        oid = hashlib.sha1(f"{repo_id}@{revision}#{len(self.hub.commits)}".encode()).hexdigest()
        self.hub.commits.append({"repo": repo_id, "revision": revision, "oid": oid, "files": sorted(writes)})
        self._json(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})

    # -- dispatch -------------------------------------------------------------------------------------------
    def _handle(self, head: bool) -> None:
        url = urlsplit(self.path)
        self._authorized = False
        self._pending = url.path != "/_admin/requests"  # logged with the status line
        try:
            authorized = self._auth()
            self._authorized = authorized
            if url.path == "/_admin/requests":
                self._json(200, self.hub.log_snapshot())
                return
            if m := _API.match(url.path):
                self._api(m, parse_qs(url.query), authorized, head)
            elif m := _RESOLVE.match(url.path):
                self._resolve(m, authorized, head)
            elif m := _CDN.match(url.path):
                self._cdn(m, head)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as exc:
            self._error(exc, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if self._pending:  # nothing was sent back
                self._log(499)

    def send_response(self, code: int, message: str | None = None) -> None:
        # Log when the status goes out, so a client that reads the log right after a response sees it.
        if getattr(self, "_pending", False):
            self._log(code)
        super().send_response(code, message)

    def _log(self, status: int) -> None:
        self._pending = False
        path = unquote(urlsplit(self.path).path)
        self.hub.log(LoggedRequest(self.command, path, self.headers.get("Range"), status, self._authorized))

    def _auth(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header:
            return False
        given = header.removeprefix("Bearer ").strip()
        if self.hub.token is None or given != self.hub.token:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return True

    def _repo(
        self, repo_type: str, org: str, name: str, revision: str, authorized: bool
    ) -> tuple[str, Path, str]:
        """(repo_id, revision folder, commit) or the Hub's error for a missing/private repo or revision."""
        repo_id = f"{unquote(org)}/{unquote(name)}"
        revs = self.hub.revisions(repo_id, repo_type)
        if not revs or (self.hub.is_private(repo_id, repo_type) and not authorized):
            if authorized:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            raise _HubError(401, "RepoNotFound", "Invalid username or password.")
        revision = quote(unquote(revision), safe="")  # as a folder name
        if (self.hub.repo_dir(repo_id, repo_type) / ".gated").exists() and not authorized:
            raise _HubError(
                401, "GatedRepo", "Access to this repo is restricted. You must accept its conditions."
            )
        if revision in revs:
            folder = revs[revision]
        elif revision in revs.values():
            folder = revision
        else:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        commit = commit_id(repo_type, repo_id, unquote(folder))
        return repo_id, self.hub.repo_dir(repo_id, repo_type) / folder, commit

    def _api(self, m: re.Match[str], query: dict[str, list[str]], authorized: bool, head: bool) -> int:
        kind, org, name, rest = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        repo_type = kind[:-1]
        if rest == "" or rest.startswith("revision/"):
            revision = rest.removeprefix("revision/") or "main"
            repo_id, base, commit = self._repo(repo_type, org, name, revision, authorized)
            siblings = [{"rfilename": p.relative_to(base).as_posix()} for p in _walk(base)]
            body = {
                "_id": commit[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit,
                "private": self.hub.is_private(repo_id, repo_type),
                "gated": "manual" if (self.hub.repo_dir(repo_id, repo_type) / ".gated").exists() else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": siblings,
            }
            self._json(200, body, head)
            return 200
        if rest.startswith("tree/"):
            segments = rest.split("/")  # quoted: the revision and path are single segments
            revision = segments[1] if len(segments) > 1 else "main"
            sub = unquote("/".join(segments[2:])).strip("/")
            repo_id, base, _ = self._repo(repo_type, org, name, revision, authorized)
            return self._tree(base, sub, query, head)
        raise _HubError(404, None, "Not Found")

    def _tree(self, base: Path, sub: str, query: dict[str, list[str]], head: bool) -> int:
        start = base / sub if sub else base
        if not start.is_dir():
            raise _HubError(404, "EntryNotFound", f"{sub} does not exist on this revision")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = []
        paths = sorted(start.rglob("*") if recursive else start.iterdir())
        for p in paths:
            rel = p.relative_to(base).as_posix()
            if p.is_dir():
                entries.append(
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(rel.encode()).hexdigest(),
                        "size": 0,
                        "path": rel,
                    }
                )
                continue
            blob, sha = self.hub.hashes(p)
            entry: dict[str, Any] = {"type": "file", "oid": blob, "size": p.stat().st_size, "path": rel}
            if self.hub.is_lfs(p):
                entry["lfs"] = {"oid": sha, "size": p.stat().st_size, "pointerSize": 134}
                entry["oid"] = hashlib.sha1(f"pointer {sha}".encode()).hexdigest()
            entries.append(entry)
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor : cursor + self.hub.page_size]
        headers = {}
        if cursor + self.hub.page_size < len(entries):
            url = urlsplit(self.path)
            params = {k: v[0] for k, v in query.items() if k != "cursor"}
            params["cursor"] = str(cursor + self.hub.page_size)
            qs = "&".join(f"{k}={quote(v)}" for k, v in params.items())
            headers["Link"] = f'<{self.hub.endpoint}{url.path}?{qs}>; rel="next"'
        self._json(200, page, head, headers)
        return 200

    def _resolve(self, m: re.Match[str], authorized: bool, head: bool) -> int:
        repo_type = "dataset" if m.group(1) else "model"
        _, base, commit = self._repo(repo_type, m.group(2), m.group(3), m.group(4), authorized)
        rel = unquote(m.group(5))
        path = self._file(base, rel)
        if self.hub.lfs_redirect and self.hub.is_lfs(path):
            where = f"{repo_type}/{m.group(2)}/{m.group(3)}/{commit}/{quote(rel)}"
            _, sha = self.hub.hashes(path)
            self.send_response(302)
            self.send_header("Location", f"{self.hub.lfs_redirect}/cdn/{where}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(path.stat().st_size))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return 302
        return self._send_file(path, commit, head)

    def _cdn(self, m: re.Match[str], head: bool) -> int:
        if self.headers.get("Authorization"):
            raise _HubError(400, None, "Only one auth mechanism allowed: the URL is already signed")
        repo_type, org, name, commit, rel = m.groups()
        revision = self.hub.revisions(f"{org}/{name}", repo_type).get(commit)
        if not revision:
            raise _HubError(404, None, "Not Found")
        base = self.hub.repo_dir(f"{org}/{name}", repo_type) / revision
        return self._send_file(self._file(base, unquote(rel)), commit, head)

    @staticmethod
    def _file(base: Path, rel: str) -> Path:
        path = (base / rel).resolve()
        if not path.is_file() or not str(path).startswith(str(base.resolve()) + os.sep):
            raise _HubError(404, "EntryNotFound", f"{rel} does not exist on this revision")
        return path

    def _send_file(self, path: Path, commit: str, head: bool) -> int:
        size = path.stat().st_size
        blob, sha = self.hub.hashes(path)
        lfs = self.hub.is_lfs(path)
        etag = f'"{sha if lfs else blob}"'
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        mode = self.hub.range_mode
        if rng and mode != "ignore":
            parsed = _parse_range(rng, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 416
            start, end, status = parsed[0], parsed[1], 206
            if mode == "shift" and end < size:
                start, end = start + 1, end + 1
        send_range = status == 206 and mode != "bare"
        status = 200 if mode == "bare" else status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("X-Repo-Commit", commit)
        if lfs:
            self.send_header("X-Linked-Etag", etag)
            self.send_header("X-Linked-Size", str(size))
        if send_range:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not head:
            with open(path, "rb") as src:
                src.seek(start)
                left = end - start
                while left > 0:
                    block = src.read(min(1 << 20, left))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)
        return status

    # -- responses ------------------------------------------------------------------------------------------
    def _json(
        self, status: int, body: Any, head: bool = False, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, exc: _HubError, head: bool) -> None:
        data = json.dumps({"error": exc.message}).encode()
        self.send_response(exc.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Error-Message", exc.message)
        if exc.code:
            self.send_header("X-Error-Code", exc.code)
        self.end_headers()
        if not head:
            self.wfile.write(data)


def _walk(base: Path) -> list[Path]:
    return sorted(p for p in base.rglob("*") if p.is_file())


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """bytes=A-B, bytes=A- or bytes=-N -> [start, end) or None when unsatisfiable."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        return (max(size - n, 0), size) if n else None
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    return (start, end) if start < size and start < end else None


def start_hub_server(
    root: str | os.PathLike[str],
    token: str | None = None,
    private: tuple[str, ...] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    **kwargs: Any,
) -> HubServer:
    """Start a HubServer in a background thread of this process; stop it with `.stop()` or `with`."""
    return HubServer(root, token, private, host, port, **kwargs).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder of repos (see the layout above)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for containers)")
    parser.add_argument("--token", default=None, help="the one valid token; private repos require it")
    parser.add_argument(
        "--private", action="append", default=[], help="ORG/NAME of a private repo (repeatable)"
    )
    parser.add_argument("--lfs-threshold", type=int, default=DEFAULT_LFS_THRESHOLD)
    args = parser.parse_args()
    hub = HubServer(args.root, args.token, tuple(args.private), args.host, args.port, args.lfs_threshold)
    print(json.dumps({"endpoint": hub.endpoint}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        hub.httpd.serve_forever()


if __name__ == "__main__":
    main()
