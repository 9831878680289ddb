"""Ranged HTTP GETs shared by the Hub source (resolve URLs) and the S3 source (SigV4-signed object URLs),
and the model exporter's object PUTs, whose bodies go from the file to the socket (`FileRange`).

One pool per source: keep-alive `http.client` connections per origin, or urllib3 through the proxy the
environment names; redirects followed here (Authorization dropped when the host changes); streaming reads
with a read timeout; and one mapping of HTTP outcomes: 429 / 5xx / broken connections / S3's retryable
codes are TransientError (with Retry-After); other 3xx / 4xx are InitializerError with a message the
source supplies. Direct requests skip urllib3's request machinery: a third less CPU per request, which
is most of a small file's cost.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

from ..errors import (
    InitializerError,
    RangeIgnored,
    TransientError,
    one_line,
    origin_of,
    parse_retry_after,
    register_secret,
    speaks,
    tls_answer,
    tls_failure,
)

CHUNK = 1024 * 1024
# A body must deliver this many bytes in every INIT_READ_TIMEOUT seconds (about 1 KiB/s at the default
# 60 s): the socket timeout alone is reset by every byte, so a body trickling 1 byte/s would never end.
MIN_PROGRESS = 64 * 1024
USER_AGENT = "kubeflow-trainer-initializer/2.0.0"
CONNECT_TIMEOUT = 10.0  # or INIT_READ_TIMEOUT when shorter: a connect never waits longer than a read may
MAX_REDIRECTS = 10
# S3-style error codes worth retrying even when the status is a 4xx (e.g. 400 RequestTimeout).
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
_S3_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_REDIRECTS = {301, 302, 303, 307, 308}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# What a broken or stalled connection raises, from http.client and from urllib3.
BROKEN = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError)

Origin = tuple[str, str, int]
# How a TLS server ends a plain-HTTP request it cannot read: a reset, a close, or a TLS alert for a status.
_CUT_OFF = (ConnectionResetError, http.client.RemoteDisconnected, http.client.BadStatusLine)


@dataclass
class Reply:
    """One HTTP response being read; `finish(reuse)` hands its connection back (or closes it)."""

    status: int
    headers: Any  # a Mapping with case-insensitive .get()
    read: Callable[[int], bytes]
    read1: Callable[[int], bytes]  # what has arrived, up to n bytes, with at most one socket read
    finish: Callable[[bool], None]


class Pool:
    """Connections for one source. HTTPS_PROXY, HTTP_PROXY and NO_PROXY (either case) are honoured as
    botocore and huggingface_hub honour them, so listing and downloads take the same route; a proxy's
    user:password goes into Proxy-Authorization. `ca_bundle` replaces the system's CA certificates."""

    def __init__(self, concurrency: int, read_timeout: float, ca_bundle: str | None = None):
        self.read_timeout = read_timeout
        self._ca_bundle = ca_bundle
        self._options: dict[str, Any] = {
            "maxsize": concurrency + 4,
            "timeout": urllib3.Timeout(connect=min(CONNECT_TIMEOUT, read_timeout), read=read_timeout),
            "retries": False,  # the engine retries; redirects are followed in `get`
            "headers": {"User-Agent": USER_AGENT},
        }
        self._proxies = urllib.request.getproxies_environment()
        self._via: dict[str, urllib3.ProxyManager] = {}  # proxy URL -> its pool
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._active: set[Any] = set()  # connections (or proxied responses) a reply is being read from
        self._tls_context: ssl.SSLContext | None = None
        self._speaks_tls: dict[Origin, bool] = {}  # http:// origins probed after they broke a connection
        self._lock = threading.Lock()

    def get(self, url: str, headers: dict[str, str], follow: bool = True) -> Reply:
        """GET `url`, following redirects unless not to `follow`; the caller must `finish` the reply."""
        for _ in range(MAX_REDIRECTS + 1):
            reply = self.send("GET", url, headers)
            location = reply.headers.get("Location") if follow and reply.status in _REDIRECTS else None
            if not location:
                return reply
            reply.read(64 * 1024)  # a redirect's body is short: read it so the connection can be reused
            reply.finish(True)
            target = urljoin(url, location)
            if same_origin_key(target) != same_origin_key(url):  # never send a credential to another host
                headers = {k: v for k, v in headers.items() if not _credential(k)}
            url = target
        raise InitializerError(f"more than {MAX_REDIRECTS} redirects from {url.split('?')[0]}")

    def send(
        self, method: str, url: str, headers: dict[str, str], body: FileRange | bytes | None = None
    ) -> Reply:
        """One request, redirects not followed; the caller must `finish` the reply. A `body` goes with the
        headers the caller gives (Content-Length among them)."""
        proxy = self._proxy_for(url)
        if proxy:
            presp = proxy.request(
                method, url, body=body, headers=headers, preload_content=False, redirect=False
            )
            self._track(presp)

            def release(reuse: bool) -> None:
                self._untrack(presp)
                _release(presp, reuse)

            # read1 undecoded, as http.client's is: a gzip answer is inflated (within a cap) by the reader.
            return Reply(
                presp.status,
                presp.headers,
                presp.read,
                lambda n: presp.read1(n, decode_content=False),
                release,
            )
        origin = same_origin_key(url)
        parts = urlsplit(url)
        conn = self._take(origin)
        self._track(conn)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, target, body=body if isinstance(body, bytes) else None, headers=headers)
            if isinstance(body, FileRange):
                body.send_to(conn.sock)
            resp = conn.getresponse()
        except BaseException:
            self._untrack(conn)
            conn.close()
            raise

        def read1(n: int) -> bytes:
            data = resp.read1(n) if resp.length != 0 else b""
            if resp.length == 0 and not resp.isclosed():
                resp.close()  # the whole body is read: what read() does, so the connection can be reused
            return data

        def finish(reuse: bool) -> None:
            self._untrack(conn)
            if reuse and resp.isclosed() and not resp.length:  # all of the body read: the connection is free
                with self._lock:
                    self._idle.setdefault(origin, []).append(conn)
            else:
                conn.close()

        return Reply(resp.status, resp.headers, resp.read, read1, finish)

    def _track(self, conn: Any) -> None:
        with self._lock:
            self._active.add(conn)

    def _untrack(self, conn: Any) -> None:
        with self._lock:
            self._active.discard(conn)

    def abort(self) -> None:
        """Shut down the sockets of replies being read, so threads blocked reading them return at once
        (a stop must not wait for a stalled server's read timeout)."""
        with self._lock:
            active = list(self._active)
        for conn in active:
            sock = getattr(conn, "sock", None) or getattr(getattr(conn, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _take(self, origin: Origin) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if not _closed_by_peer(conn):
                return conn
            conn.close()  # the server ended this idle connection (keep-alive timeout)
        scheme, host, port = origin
        connect = min(CONNECT_TIMEOUT, self.read_timeout)
        if scheme == "https":
            return _HTTPSConnection(host, port, timeout=connect, context=self._tls(), pool=self)
        return _HTTPConnection(host, port, timeout=connect, pool=self)

    def _proxy_for(self, url: str) -> urllib3.ProxyManager | None:
        """The proxy's pool for `url`, or None to connect directly."""
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if not proxy or urllib.request.proxy_bypass_environment(parts.netloc, self._proxies):
            return None
        with self._lock:
            manager = self._via.get(proxy)
        if manager is None:
            manager = _proxy_manager(proxy, {**self._options, "ssl_context": self._tls()})
            with self._lock:
                manager = self._via.setdefault(proxy, manager)
        return manager

    def tls_instead(self, url: str, exc: BaseException) -> InitializerError | None:
        """For a connection to an http:// URL that the server broke off: the fix when the server speaks TLS
        (it dropped a plain request it could not read). Asked once per origin, with one TLS handshake."""
        scheme, host, port = origin = same_origin_key(url)
        if scheme != "http" or self._proxy_for(url) or not isinstance(exc, _CUT_OFF):
            return None
        with self._lock:
            known = self._speaks_tls.get(origin)
        if known is None:
            known = _handshakes(host, port, min(CONNECT_TIMEOUT, self.read_timeout))
            with self._lock:
                self._speaks_tls[origin] = known
        return speaks(origin_of(url), "TLS") if known else None

    def _tls(self) -> ssl.SSLContext:
        """The TLS settings, made on first use: loading the CA certificates costs 50 ms."""
        with self._lock:
            if self._tls_context is None:
                self._tls_context = ssl.create_default_context(cafile=self._ca_bundle)
            return self._tls_context

    def clear(self) -> None:
        with self._lock:
            idle = [conn for conns in self._idle.values() for conn in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()
        for manager in self._via.values():
            manager.clear()


class _Timeouts:
    """Connect within CONNECT_TIMEOUT (or the read timeout), then let each read wait the read timeout."""

    def __init__(self, *args: Any, pool: Pool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._read_timeout = pool.read_timeout

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self._read_timeout)  # type: ignore[attr-defined]


class _HTTPConnection(_Timeouts, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Timeouts, http.client.HTTPSConnection):
    pass


def _handshakes(host: str, port: int, timeout: float) -> bool:
    """Whether the server at host:port completes a TLS handshake (its certificate is not checked: this only
    asks which protocol it speaks)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ValueError):
        return False


def _credential(name: str) -> bool:
    """Headers that only the first host may see: credentials, and the signature's parts (a SigV4 session
    token, the signed Host) that are meaningless, or a leak, anywhere else."""
    name = name.lower()
    return name in ("authorization", "host", "cookie") or name.startswith("x-amz-")


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is readable only once the server closed it (or broke the protocol)."""
    if conn.sock is None:
        return False  # closed on our side: http.client reconnects on the next request
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


def same_origin_key(url: str) -> Origin:
    """(scheme, host, port), the default port filled in: two URLs share an origin when these are equal."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)


def _release(resp: Any, reuse: bool) -> None:
    if not reuse or resp.length_remaining:
        resp.close()  # unread bytes may be left: drop this connection rather than reuse it
    resp.release_conn()


def _proxy_manager(proxy: str, options: dict[str, Any]) -> urllib3.ProxyManager:
    if "://" not in proxy:
        proxy = "http://" + proxy  # HTTPS_PROXY=host:3128 is common shorthand
    parts = urlsplit(proxy)
    headers = None
    if parts.username:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        register_secret(parts.password and unquote(parts.password))
        headers = urllib3.make_headers(proxy_basic_auth=login)
        proxy = proxy.replace(parts.netloc, parts.netloc.rsplit("@", 1)[1], 1)
    return urllib3.ProxyManager(proxy, proxy_headers=headers, **options)


def error_code(body: bytes) -> str:
    """The <Code> of an S3-style XML error body, or ''."""
    m = _S3_CODE.search(body)
    return m.group(1).decode(errors="replace") if m else ""


def open_reply(
    pool: Pool,
    url: str,
    headers: dict[str, str],
    what: str,
    for_botocore: bool = False,
    put: FileRange | bytes | None = None,
) -> Reply:
    """GET `url`, redirects followed (or, with `put`, PUT that body, redirects not followed). A broken
    connection raises TransientError, an untrusted certificate InitializerError; so do 429 or 5xx to a GET
    (with the server's Retry-After); the caller must `finish` the reply. `for_botocore`: redirects and
    error statuses are left to botocore, which sent the request; a PUT's error answers to the caller."""
    try:
        if put is not None:
            reply = pool.send("PUT", url, headers, put)
        else:
            reply = pool.get(url, headers, follow=not for_botocore)
    except BROKEN as exc:
        raise (
            tls_failure(exc, origin_of(url))
            or pool.tls_instead(url, exc)
            or TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}")
        ) from None
    if not for_botocore and put is None and (reply.status == 429 or reply.status >= 500):
        reply.finish(False)
        retry_after = parse_retry_after(reply.headers.get("Retry-After"))
        raise TransientError(f"{what}: HTTP {reply.status}", retry_after)
    return reply


@contextmanager
def get_range(
    pool: Pool,
    url: str,
    what: str,
    start: int,
    end: int,
    size: int,
    headers: dict[str, str] | None = None,
    fatal: Callable[[int, str], InitializerError | None] | None = None,
    sign: Callable[[str, dict[str, str]], dict[str, str]] | None = None,
    etag: str | None = None,
    inspect: Callable[[Any], None] | None = None,
) -> Iterator[Iterator[bytes]]:
    """GET bytes [start, end) of a `size`-byte resource as chunks. `sign(url, headers)` may add
    authentication over the final headers (Range included); `fatal(status, code)` may turn an error status
    into a one-line InitializerError; otherwise 3xx / 4xx are fatal with a generic message. An answer whose
    ETag is not `etag` is a changed resource (412), for servers that ignore If-Match. `inspect(headers)`
    sees the headers of an accepted answer."""
    headers = dict(headers or {})
    ranged = start > 0 or end < size
    if ranged:
        headers["Range"] = f"bytes={start}-{end - 1}"
    if sign:
        headers = sign(url, headers)
    headers["Accept-Encoding"] = "identity"
    headers.setdefault("User-Agent", USER_AGENT)
    reply = open_reply(pool, url, headers, what)
    complete = False
    try:
        status = reply.status
        if status >= 300:
            body = reply.read(4096)
            code = error_code(body)
            if wrong := tls_answer(status, body, url):
                raise wrong
            if code in TRANSIENT_CODES:
                raise TransientError(f"{what}: {code} (HTTP {status})")
            raise (fatal and fatal(status, code)) or InitializerError(
                f"{what}: HTTP {status} {code}".rstrip() + "; check the source and credentials"
            )
        _check_body(reply, what, start, end, size, ranged, url)
        got = (reply.headers.get("ETag") or "").removeprefix("W/").strip('"')
        if etag and got and got != etag:
            raise (fatal and fatal(412, "PreconditionFailed")) or InitializerError(
                f"{what} changed during the download (ETag {got[:80]!r}, listed {etag!r}); rerun"
            )
        if inspect:
            inspect(reply.headers)
        yield _chunks(reply, what, pool.read_timeout)
        complete = True
    finally:
        reply.finish(complete)


def _check_body(reply: Reply, what: str, start: int, end: int, size: int, ranged: bool, url: str) -> None:
    """Accept a 206, or a 200, only when it carries exactly bytes [start, end) of a `size`-byte resource.

    RFC 9110 lets a server ignore Range: a 200 with the whole body then raises RangeIgnored (the engine
    streams that file whole). Some servers (rclone serve s3) answer a ranged GET with 200 and a Content-Range
    naming the range: that is the range, and is accepted like a 206."""
    status = reply.status
    if status not in (200, 206):
        raise TransientError(f"{what}: unexpected HTTP {status} for a {'ranged ' if ranged else ''}GET")
    if status == 200 and not ranged:
        return  # the whole body, as asked; its length is checked as it is read
    content_range = reply.headers.get("Content-Range")
    if content_range is not None or status == 206:
        m = _CONTENT_RANGE.fullmatch((content_range or "").strip())
        if not m or (int(m[1]), int(m[2]) + 1) != (start, end) or m[3] not in ("*", str(size)):
            raise TransientError(
                f"{what}: asked for bytes {start}-{end - 1} of {size}, the server answered HTTP {status} "
                f"with Content-Range {content_range!r}"
            )
        return
    length = reply.headers.get("Content-Length")
    if length is None or length.strip() == str(size):
        raise RangeIgnored(urlsplit(url).netloc)
    raise InitializerError(
        f"{what}: the server answered a request for bytes {start}-{end - 1} with HTTP 200 and "
        f"{length.strip()[:20]} bytes, neither that range nor the whole {size}-byte file: it mishandles "
        "Range requests; set INIT_PART_SIZE above the largest file's size to avoid them"
    )


def _chunks(reply: Reply, what: str, read_timeout: float) -> Iterator[bytes]:
    """The body as it arrives; a body that delivers under MIN_PROGRESS bytes in read_timeout seconds is a
    stalled read (TransientError), however steadily it trickles."""
    window_start, window_bytes = time.monotonic(), 0
    try:
        while chunk := reply.read1(CHUNK):
            window_bytes += len(chunk)
            if window_bytes >= MIN_PROGRESS:
                window_start, window_bytes = time.monotonic(), 0
            elif time.monotonic() - window_start > read_timeout:
                raise TransientError(
                    f"{what}: the body arrives too slowly ({window_bytes} bytes in "
                    f"{time.monotonic() - window_start:.0f}s, under {MIN_PROGRESS // 1024} KiB per "
                    f"INIT_READ_TIMEOUT={read_timeout:g}s)"
                )
            yield chunk
    except BROKEN as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}") from None


class FileRange(io.RawIOBase):
    """Bytes [start, start + length) of a file as a request body: on a plain connection the kernel sends
    them from the page cache (sendfile), never copied through Python; over TLS or a proxy they are read in
    1 MiB blocks. Seekable, so a retry sends them again."""

    def __init__(self, path: os.PathLike[str] | str, start: int, length: int):
        super().__init__()
        self._path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._start + self._pos)
        if not data:
            raise InitializerError(f"{self._path} shrank while it was being sent")
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def send_to(self, sock: socket.socket) -> None:
        self.seek(0)
        if not self._length:
            return
        if isinstance(sock, ssl.SSLSocket):
            while block := self.read(CHUNK):
                sock.sendall(block)
            return
        with open(self._path, "rb", buffering=0) as f:  # each wait within the socket's timeout
            if sock.sendfile(f, self._start, self._length) != self._length:
                raise InitializerError(f"{self._path} shrank while it was being sent")
        self._pos = self._length

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
