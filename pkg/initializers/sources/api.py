"""Listing answers read within bounds: the Hub's repo info and tree pages (JSON, `get_json`), and the S3
listing pages botocore prepares (`read_bounded`, called from `s3.S3Source._send_listing`).

Each request gets the pool's connect and read timeouts, and the whole answer a deadline derived from
INIT_READ_TIMEOUT (and never past the listing's): a server trickling a byte a second cannot hold the run,
as it could a reader that waits for a whole buffer. Bodies are capped, after decompression: a small gzip
answer that expands to gigabytes is refused when it passes the cap, not after.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import InitializerError, TransientError, one_line, tls_answer
from .http import BROKEN, USER_AGENT, Pool, Reply, open_reply

MAX_DOCUMENT = 64 * 1024 * 1024  # a Hub tree page of 1000 entries is ~0.3 MB
READ_SIZE = 64 * 1024
DEADLINE_READS = 4  # an answer may take this many INIT_READ_TIMEOUTs in all


@dataclass(frozen=True)
class Answer:
    """A JSON answer (`data`), or for an error status its headers and the start of its body."""

    status: int
    headers: Any
    data: Any = None
    text: str = ""


def get_json(pool: Pool, url: str, headers: dict[str, str], where: str, left: float) -> Answer:
    """GET `url`; 429 / 5xx / a broken or stalled connection raise TransientError, a 2xx whose body is not
    JSON an InitializerError naming `where` (the server); other statuses are returned for the caller to
    explain. `left` is what remains of the listing's time."""
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **headers, "Accept-Encoding": "gzip"}
    deadline = answer_deadline(pool, left)
    reply = open_reply(pool, url, headers, where)
    complete = False
    try:
        status = reply.status
        limit = MAX_DOCUMENT if status < 300 else 4096
        body = read_bounded(reply, where, limit, deadline, truncate=status >= 300, via=(pool, url))
        complete = True
    finally:
        reply.finish(complete)
    if status >= 300:
        if wrong := tls_answer(status, body, url):
            raise wrong
        return Answer(status, reply.headers, text=body.decode("utf-8", "replace"))
    try:
        return Answer(status, reply.headers, json.loads(body))
    except ValueError:
        kind = one_line(reply.headers.get("Content-Type") or "no Content-Type", 60)
        start = one_line(body[:40].decode("utf-8", "replace"), 60)
        raise InitializerError(
            f"{where} answered {url.split('?')[0]} with something that is not JSON ({kind}, starting "
            f"{start!r}): a captive portal or a proxy's login page in the way, or not a Hub endpoint; check "
            "HF_ENDPOINT and the network"
        ) from None


def answer_deadline(pool: Pool, left: float) -> float:
    """When an answer must have arrived: DEADLINE_READS read timeouts, never past the listing's deadline."""
    return time.monotonic() + min(left, DEADLINE_READS * pool.read_timeout)


def read_bounded(
    reply: Reply, where: str, limit: int, deadline: float, truncate: bool, via: tuple[Pool, str]
) -> bytes:
    """The body, decompressed, at most `limit` bytes (more: an error, or with `truncate` the first bytes).
    `via`: the pool and URL the reply came from (a TLS server may cut a plain request off mid-answer)."""
    encoding = (reply.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
        raise InitializerError(f"{where} answered with an unknown Content-Encoding {encoding[:40]!r}")
    inflate = None if encoding == "identity" else _Inflate()
    out = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise TransientError(f"{where}: the answer did not arrive in time (stalled or trickling?)")
        try:
            raw = reply.read1(READ_SIZE)
        except BROKEN as exc:
            raise via[0].tls_instead(via[1], exc) or TransientError(
                f"{where}: {type(exc).__name__}: {one_line(exc, 200)}"
            ) from None
        if not raw:
            break
        try:
            out += inflate.feed(raw, limit - len(out)) if inflate else raw
        except zlib.error:
            raise InitializerError(f"{where} sent a corrupt {encoding} answer") from None
        if len(out) > limit:
            if truncate:
                return bytes(out[:limit])
            raise InitializerError(
                f"{where} sent an answer larger than {limit // (1024 * 1024)} MiB"
                f"{' once decompressed' if inflate else ''}: refusing it (a broken or hostile server)"
            )
    return bytes(out)


class _Inflate:
    """gzip (any number of members) or zlib, inflated at most `room` + 1 bytes at a time: enough to tell
    that an answer passes its cap without ever holding more."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zlib.MAX_WBITS | 32)

    def feed(self, raw: bytes, room: int) -> bytes:
        out = bytearray()
        while raw and len(out) <= room:
            out += self._z.decompress(raw, room + 1 - len(out))  # never 0, which would mean no limit
            if self._z.unconsumed_tail:
                raw = self._z.unconsumed_tail
            elif self._z.eof and self._z.unused_data:  # the next gzip member
                raw = self._z.unused_data
                self._z = zlib.decompressobj(zlib.MAX_WBITS | 32)
            else:
                raw = b""
        return bytes(out)
