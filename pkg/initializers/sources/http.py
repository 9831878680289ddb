"""Ranged HTTP GETs shared by the Hub source (resolve URLs) and the S3 source (SigV4-signed object URLs).

One pool per source (urllib3, sized to the concurrency, through the environment's proxy where one is
set), streaming reads with a read timeout, and one mapping of HTTP outcomes: 429 / 5xx / broken
connections / S3's retryable codes are TransientError (with Retry-After); other 3xx / 4xx are
InitializerError with a message the source supplies. urllib3 drops the Authorization header on redirects
to another host.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import urllib3

from ..errors import InitializerError, TransientError, one_line, parse_retry_after, register_secret

CHUNK = 1024 * 1024
USER_AGENT = "kubeflow-trainer-initializer/2.0.0"
# S3-style error codes worth retrying even when the status is a 4xx (e.g. 400 RequestTimeout).
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
_S3_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


class Pool:
    """urllib3 pools for direct connections and for each proxy the environment names. HTTPS_PROXY,
    HTTP_PROXY and NO_PROXY (either case) are honoured as botocore and huggingface_hub honour them, so
    listing and downloads take the same route; a proxy's user:password goes into Proxy-Authorization."""

    def __init__(self, concurrency: int, read_timeout: float):
        self._options: dict[str, Any] = {
            "maxsize": concurrency + 4,
            "timeout": urllib3.Timeout(connect=10, read=read_timeout),
            "retries": urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10),
            "headers": {"User-Agent": USER_AGENT},
        }
        self._direct = urllib3.PoolManager(**self._options)
        self._proxies = urllib.request.getproxies_environment()
        self._via: dict[str, urllib3.PoolManager] = {}  # proxy URL -> its pool
        self._lock = threading.Lock()

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.manager_for(url).request(method, url, **kwargs)

    def manager_for(self, url: str) -> urllib3.PoolManager:
        """The pool for `url`: direct, or through the proxy configured for its scheme and host."""
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if not proxy or urllib.request.proxy_bypass_environment(parts.netloc, self._proxies):
            return self._direct
        with self._lock:
            if proxy not in self._via:
                self._via[proxy] = _proxy_manager(proxy, self._options)
            return self._via[proxy]

    def clear(self) -> None:
        self._direct.clear()
        for manager in self._via.values():
            manager.clear()


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


def new_pool(concurrency: int, read_timeout: float) -> Pool:
    return Pool(concurrency, read_timeout)


def error_code(body: bytes) -> str:
    """The <Code> of an S3-style XML error body, or ''."""
    m = _S3_CODE.search(body)
    return m.group(1).decode(errors="replace") if m else ""


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
) -> Iterator[Iterator[bytes]]:
    """GET bytes [start, end) of a `size`-byte resource as chunks. `sign(url, headers)` may add
    authentication over the final headers (Range included); `fatal(status, code)` may turn an error status
    into a one-line InitializerError; otherwise 3xx / 4xx are fatal with a generic message."""
    headers = dict(headers or {})
    ranged = start > 0 or end < size
    if ranged:
        headers["Range"] = f"bytes={start}-{end - 1}"
    if sign:
        headers = sign(url, headers)
    headers["Accept-Encoding"] = "identity"
    try:
        resp = pool.request("GET", url, headers=headers, preload_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}") from None
    try:
        status = resp.status
        if status == 429 or status >= 500:
            raise TransientError(f"{what}: HTTP {status}", parse_retry_after(resp.headers.get("Retry-After")))
        if status >= 300:  # redirects with a Location were followed; what is left is an error
            code = error_code(resp.read(4096))
            if code in TRANSIENT_CODES:
                raise TransientError(f"{what}: {code} (HTTP {status})")
            raise (fatal and fatal(status, code)) or InitializerError(
                f"{what}: HTTP {status} {code}".rstrip() + "; check the source and credentials"
            )
        if status not in (200, 206) or (ranged and status != 206):
            raise TransientError(f"{what}: unexpected HTTP {status} for a {'ranged ' if ranged else ''}GET")
        yield _chunks(resp, what)
    except BaseException:
        resp.close()  # unread bytes may be left: drop this connection rather than reuse it
        raise
    finally:
        resp.release_conn()


def _chunks(resp: Any, what: str) -> Iterator[bytes]:
    try:
        yield from resp.stream(CHUNK, decode_content=False)
    except urllib3.exceptions.HTTPError as exc:
        raise TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}") from None
