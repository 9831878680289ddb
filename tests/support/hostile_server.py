"""A scriptable HTTP server for tests against broken and hostile servers (a Hub or S3 that lies, loops,
stalls, trickles, redirects elsewhere or echoes secrets), plus builders for the Hub's and S3's answers.

Each test passes a function that answers every request; the server logs what it was sent:

    from tests.support.hostile_server import Answer, HostileServer, hub_answers
    with HostileServer(hub_answers({"config.json": b"{}"}, tree=lambda page, url: ...)).start() as hub:
        ... HF_ENDPOINT=hub.endpoint ...; hub.seen[0].headers.get("Authorization")

An `Answer` body may be bytes, or an iterable of chunks sent with chunked encoding after `pause` seconds
each (a trickle, or a stream that never ends); `hang` holds the request without answering.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from tests.support.background import BackgroundServer

COMMIT = "c0ffee" + "0" * 34


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str  # as sent: quoted, with the query
    headers: dict[str, str]

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}


@dataclass
class Answer:
    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0  # seconds before each chunk of an iterable body
    hang: float = 0.0  # seconds to hold the request before answering at all


Responder = Callable[[Seen], Answer]


class HostileServer(BackgroundServer):
    def __init__(self, respond: Responder, host: str = "127.0.0.1", port: int = 0):
        self.respond = respond
        self.seen: list[Seen] = []
        super().__init__(type("Handler", (_Handler,), {"server_of": self}), host, port, "hostile-server")

    def paths(self, contains: str = "") -> list[str]:
        with self._lock:
            return [s.path for s in self.seen if contains in s.path]


class _Handler(BaseHTTPRequestHandler):
    server_of: HostileServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no delayed-ACK stall between

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        seen = Seen(self.command, self.path, dict(self.headers.items()))
        with self.server_of._lock:
            self.server_of.seen.append(seen)
        answer = self.server_of.respond(seen)
        if answer.hang:
            time.sleep(answer.hang)
        try:
            self.send_response(answer.status)
            for k, v in answer.headers.items():
                self.send_header(k, v)
            if isinstance(answer.body, bytes):
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if not head:
                    self.wfile.write(answer.body)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in answer.body:
                time.sleep(answer.pause)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# -- the Hub -------------------------------------------------------------------------------------------------
def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entries(files: dict[str, bytes]) -> list[dict[str, Any]]:
    """Hub tree entries for `files`, all as regular (git) files."""
    return [{"type": "file", "oid": git_sha1(v), "size": len(v), "path": k} for k, v in files.items()]


def json_answer(data: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(200, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def hub_answers(
    files: dict[str, bytes],
    tree: Responder | None = None,
    info: Responder | None = None,
) -> Responder:
    """A Hub serving one repo (any name, model or dataset) of `files` at COMMIT; `tree` and `info` replace
    the honest answers to the tree listing and the repo info."""
    honest_tree = json_answer(tree_entries(files))

    def respond(seen: Seen) -> Answer:
        path = unquote(urlsplit(seen.path).path)
        if path.startswith("/api/") and "/tree/" in path:
            return tree(seen) if tree else honest_tree
        if path.startswith("/api/"):
            return info(seen) if info else json_answer({"id": "org/name", "sha": COMMIT})
        if "/resolve/" in path:
            data = files.get(path.split(f"/resolve/{COMMIT}/", 1)[-1])
            if data is not None:
                return Answer(200, data, {"ETag": f'"{git_sha1(data)}"'})
        return Answer(404, b"{}", {"X-Error-Code": "EntryNotFound"})

    return respond


def gzip_bomb(expanded: int, member: int = 1 << 20) -> bytes:
    """A gzip body of about expanded/1000 bytes that inflates to `expanded` bytes of spaces: one member of
    `member` spaces, repeated (a gzip stream may hold many members)."""
    one = gzip.compress(b" " * member, 9)
    return one * (expanded // member)


# -- S3 ------------------------------------------------------------------------------------------------------
def s3_listing(
    objects: Iterable[tuple[str | None, str]],
    token: str | None = None,
    bucket: str = "bucket",
    prefix: str = "",
) -> Answer:
    """A ListObjectsV2 page; `objects` are (key, size) as text, so a test can send a size like 'abc'; a key of
    None leaves <Key> out. `token` makes the page truncated, with that continuation token. No ETags: the
    size is the version."""
    contents = "".join(
        "<Contents>"
        + (f"<Key>{escape(key)}</Key>" if key is not None else "")
        + f"<Size>{escape(size)}</Size></Contents>"
        for key, size in objects
    )
    more = f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix><MaxKeys>1000</MaxKeys>"
        + (more if token else "<IsTruncated>false</IsTruncated>")
        + contents
        + "</ListBucketResult>"
    )
    return Answer(200, body.encode(), {"Content-Type": "application/xml"})


def s3_answers(objects: dict[str, bytes], listing: Responder | None = None) -> Responder:
    """S3 (path style, any bucket, signatures unchecked) serving `objects` by key; `listing` replaces the
    honest ListObjectsV2 answer."""

    def respond(seen: Seen) -> Answer:
        if "list-type" in seen.query:
            if listing:
                return listing(seen)
            prefix = seen.query.get("prefix", "")
            found = [(k, str(len(v))) for k, v in sorted(objects.items()) if k.startswith(prefix)]
            return s3_listing(found, prefix=prefix)
        key = unquote(urlsplit(seen.path).path).split("/", 2)[-1]
        if key in objects:
            return Answer(200, objects[key])
        return Answer(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})

    return respond


def endless_s3(fresh_keys: bool, per_page: int = 1000) -> Responder:
    """An S3 listing that is truncated on every page with a fresh continuation token, forever: with
    `fresh_keys` each page lists new keys, else the same ones again."""
    pages = itertools.count()

    def respond(seen: Seen) -> Answer:
        n = next(pages) if fresh_keys else 0
        keys = ((f"p/{n}-{i}", "1") for i in range(per_page))
        return s3_listing(keys, token=f"token-{time.monotonic_ns()}", prefix="p/")

    return respond
