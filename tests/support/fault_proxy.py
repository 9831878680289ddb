"""A reverse proxy injecting faults in front of any HTTP server (moto, the Hub server); counts requests.
It also serves as a forward proxy (HTTP_PROXY / HTTPS_PROXY=its endpoint): requests for absolute URLs go to
the server they name, with the same faults, and the log marks them `forward`, with the Proxy-Authorization
user; CONNECT opens a tunnel (logged once, with the target as its path).

Faults are rules consumed in order: each matching request uses up one of a rule's `times`.
- `status`: answer with that HTTP status (e.g. 500, 503, 429) and an optional Retry-After header;
- `drop`: forward, but cut the connection after `drop` bytes of the response body;
- `stall`: forward, send the headers and `stall_after` bytes of the body, then pause `stall` seconds;
- `corrupt`: forward, flipping the body byte at that offset (checksum verification must catch it): the
  request's body when it has one (an upload damaged on the way), else the response's;
- `trickle`: forward, send `stall_after` bytes of the body, then one byte every `trickle` seconds;
- `headers`: forward, with these response headers set (replacing the server's of the same name);
- `replace`: forward, with the body's first occurrence of `replace[0]` replaced by `replace[1]`;
- `delay`: wait that many seconds before forwarding (a slow upload; the exporter's kill tests use it).
A rule with `skip=N` lets its first N matching requests through untouched.
A rule matches when `match` is a substring of the unquoted URL path and the method is `method`
(default GET; "*" for any). The Host header is passed through unchanged, so S3 signatures stay valid.

With `verify_checksums` set, it refuses a request whose x-amz-checksum-crc32 is not its body's CRC32 (400
BadDigest), as AWS does, in front of servers that do not check it (moto, rclone); with `refuse_checksums`,
any request with an x-amz-checksum-* header (400 InvalidArgument), as a store without them may.

With `bucket_region` set, it also acts as AWS does for a bucket in that region: a request signed for any
other region gets 400 AuthorizationHeaderMalformed naming the right one, and every answer carries
`x-amz-bucket-region` (listings only while `region_in_listings`, as AWS does; HeadBucket always names it).

CLI (prints one JSON line {"endpoint": ...} once ready):

    python -m tests.support.fault_proxy --upstream http://127.0.0.1:9000 [--port 0] [--host 127.0.0.1]
        [--fault "status=503,times=3,match=/bucket/"] [--fault "drop=65536,times=2"]
        [--fault "status=429,retry_after=1"]

Python:

    from tests.support.fault_proxy import FaultProxy
    with FaultProxy(upstream).start() as proxy:
        proxy.fail(503, times=3); proxy.drop(after_bytes=65536, times=2, match="/big")
        ... proxy.endpoint ...; proxy.count("/big")

Over HTTP, for other processes: `POST /_proxy/faults` (JSON list of rule objects), `DELETE /_proxy/faults`,
`GET /_proxy/requests` (the log), `POST /_proxy/reset` (clear the log).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import re
import socket
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.support.background import BackgroundServer

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "upgrade",
    "trailer",
}


@dataclass
class FaultRule:
    status: int | None = None  # answer with this status instead of forwarding
    retry_after: float | None = None
    drop: int | None = None  # cut the body after this many bytes
    stall: float | None = None  # pause this many seconds after `stall_after` body bytes
    stall_after: int = 0
    corrupt: int | None = None  # flip the body byte at this offset
    trickle: float | None = None  # after `stall_after` bytes, one byte every this many seconds
    headers: dict[str, str] | None = None  # response headers to set
    replace: tuple[str, str] | None = None  # (old, new): rewrite the body
    delay: float | None = None  # wait this many seconds before forwarding
    skip: int = 0  # let this many matching requests through first
    times: int = 1
    match: str = ""
    method: str = "GET"

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.match in path and self.method in ("*", method)


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    range: str | None
    status: int
    fault: str | None
    forward: bool = False  # sent to us as a forward proxy (absolute URL), as HTTP(S)_PROXY clients do
    proxy_user: str | None = None  # the user of its Proxy-Authorization (Basic), if any


class FaultProxy(BackgroundServer):
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.rules: list[FaultRule] = []
        self.bucket_region: str | None = None
        self.verify_checksums = False
        self.refuse_checksums = False
        self.region_in_listings = True
        super().__init__(type("Handler", (_Handler,), {"proxy": self}), host, port, "fault-proxy")

    # -- faults ---------------------------------------------------------------------------------------------
    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self.rules.append(rule)

    def fail(self, status: int, times: int = 1, match: str = "", retry_after: float | None = None) -> None:
        self.add(FaultRule(status=status, retry_after=retry_after, times=times, match=match))

    def drop(self, after_bytes: int, times: int = 1, match: str = "") -> None:
        self.add(FaultRule(drop=after_bytes, times=times, match=match))

    def stall(self, seconds: float, times: int = 1, match: str = "", after_bytes: int = 0) -> None:
        self.add(FaultRule(stall=seconds, stall_after=after_bytes, times=times, match=match))

    def trickle(self, every: float, times: int = 1, match: str = "", after_bytes: int = 0) -> None:
        self.add(FaultRule(trickle=every, stall_after=after_bytes, times=times, match=match))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def pending(self) -> int:
        """Fault injections not yet used up."""
        with self._lock:
            return sum(r.times for r in self.rules)

    def take(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    if rule.skip > 0:
                        rule.skip -= 1
                        return None
                    rule.times -= 1
                    return rule
        return None


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def do_CONNECT(self) -> None:
        """A tunnel to host:port, as HTTPS_PROXY clients ask: logged as one CONNECT request, then the
        encrypted bytes are passed through untouched (no faults inside a tunnel)."""
        host, _, port = self.path.rpartition(":")
        self._pending = (self.path, None)
        try:
            upstream = socket.create_connection((host, int(port)), timeout=30)
        except OSError:
            self._reply(502, b"cannot reach " + self.path.encode())
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        pipe = threading.Thread(target=_pump, args=(upstream, self.connection), daemon=True)
        pipe.start()
        _pump(self.connection, upstream)
        pipe.join()
        self.close_connection = True

    def _admin(self, path: str) -> bool:
        if path == "/_proxy/requests" and self.command == "GET":
            self._reply(200, json.dumps(self.proxy.log_snapshot()).encode())
        elif path == "/_proxy/faults" and self.command == "POST":
            for rule in json.loads(self._body() or b"[]"):
                self.proxy.add(FaultRule(**rule))
            self._reply(200, b"{}")
        elif path == "/_proxy/faults" and self.command == "DELETE":
            self.proxy.clear()
            self._reply(200, b"{}")
        elif path == "/_proxy/reset" and self.command == "POST":
            self.proxy.reset_log()
            self._reply(200, b"{}")
        else:
            return False
        return True

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith("/_proxy/") and self._admin(path):
            return
        body = self._body()
        self._pending: tuple[str, str | None] | None = (path, None)  # logged with the status line
        if self._refuse_wrong_region():
            return
        rule = self.proxy.take(self.command, path)
        fault = None if rule is None else json.dumps({k: v for k, v in asdict(rule).items() if v is not None})
        self._pending = (path, fault)
        try:
            if rule is not None and rule.status is not None:
                status = rule.status
                headers = {"Content-Type": "application/xml"}
                if rule.retry_after is not None:
                    headers["Retry-After"] = str(int(rule.retry_after))
                self._reply(
                    status, b"<Error><Code>InjectedFault</Code><Message>injected</Message></Error>", headers
                )
                return
            if rule is not None and rule.delay:
                time.sleep(rule.delay)
            if rule is not None and rule.corrupt is not None and body:
                i = min(rule.corrupt, len(body) - 1)
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
                rule = None  # the response goes back untouched
            crc = self.headers.get("x-amz-checksum-crc32")
            if self.proxy.refuse_checksums and any(
                k.lower().startswith("x-amz-checksum") for k in self.headers
            ):
                self._reply(400, b"<Error><Code>InvalidArgument</Code><Message>checksum</Message></Error>")
                return
            if self.proxy.verify_checksums and crc and crc != _crc32(body):
                self._reply(400, b"<Error><Code>BadDigest</Code><Message>CRC32</Message></Error>")
                return
            self._forward(body, rule)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if self._pending is not None:  # nothing was sent back
                self._log(502)

    def _refuse_wrong_region(self) -> bool:
        region = self.proxy.bucket_region
        signed = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/", self.headers.get("Authorization", ""))
        if region is None or signed is None or signed.group(1) == region:
            return False
        message = f"the region '{signed.group(1)}' is wrong; expecting '{region}'"
        body = f"<Error><Code>AuthorizationHeaderMalformed</Code><Message>{message}</Message>"
        body += f"<Region>{region}</Region></Error>"
        headers = {"Content-Type": "application/xml", "x-amz-bucket-region": region}
        self._reply(400, body.encode(), headers)
        return True

    def send_response(self, code: int, message: str | None = None) -> None:
        # Log when the status goes out, so a client that reads the log right after a response sees it.
        if getattr(self, "_pending", None) is not None:
            self._log(code)
        super().send_response(code, message)

    def _log(self, status: int) -> None:
        assert self._pending is not None
        path, fault = self._pending
        self._pending = None
        user = None
        auth = self.headers.get("Proxy-Authorization", "")
        if auth.startswith("Basic "):
            user = base64.b64decode(auth[6:]).decode().partition(":")[0]
        request = ProxiedRequest(
            self.command, path, self.headers.get("Range"), status, fault, "://" in self.path, user
        )
        self.proxy.log(request)

    def _forward(self, body: bytes, rule: FaultRule | None) -> int:
        host, port, target = self.proxy.upstream_host, self.proxy.upstream_port, self.path
        if "://" in target:  # a forward-proxy request names its server itself
            url = urlsplit(target)
            host, port = url.hostname or host, url.port or 80
            target = url.path + (f"?{url.query}" if url.query else "")
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            data_len = resp.getheader("Content-Length")
            payload = None if data_len is not None else resp.read()
            if rule is not None and rule.replace is not None and self.command != "HEAD":
                old, new = (x.encode() for x in rule.replace)
                payload = (payload if payload is not None else resp.read()).replace(old, new, 1)
                data_len = None
            self.send_response(resp.status)
            region = self.proxy.bucket_region
            if "list-type=" in self.path and not self.proxy.region_in_listings:
                region = None
            skip = _HOP | {"content-length"} | ({"x-amz-bucket-region"} if region else set())
            extra = (rule.headers if rule is not None else None) or {}
            skip |= {k.lower() for k in extra}
            for k, v in resp.getheaders():
                if k.lower() not in skip:
                    self.send_header(k, v)
            for k, v in extra.items():
                self.send_header(k, v)
            if region:
                self.send_header("x-amz-bucket-region", region)
            self.send_header("Content-Length", data_len if data_len is not None else str(len(payload or b"")))
            self.end_headers()
            if self.command == "HEAD":
                return resp.status
            sent = 0
            while True:
                block = payload if payload is not None else resp.read(64 * 1024)
                payload = b"" if payload is not None else None
                if not block:
                    break
                if rule is not None and rule.corrupt is not None and sent <= rule.corrupt < sent + len(block):
                    i = rule.corrupt - sent
                    block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1 :]
                if rule is not None and rule.drop is not None and sent + len(block) >= rule.drop:
                    self.wfile.write(block[: max(rule.drop - sent, 0)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the client sees a short body
                    return resp.status
                if rule is not None and rule.trickle is not None and sent + len(block) >= rule.stall_after:
                    cut = max(rule.stall_after - sent, 0)
                    self.wfile.write(block[:cut])
                    self.wfile.flush()
                    for i in range(cut, len(block)):  # until the client gives up
                        time.sleep(rule.trickle)
                        self.wfile.write(block[i : i + 1])
                        self.wfile.flush()
                    sent += len(block)
                    continue
                if rule is not None and rule.stall is not None and sent + len(block) >= rule.stall_after:
                    cut = max(rule.stall_after - sent, 0)
                    self.wfile.write(block[:cut])
                    self.wfile.flush()
                    time.sleep(rule.stall)
                    block, sent = block[cut:], sent + cut
                    rule = None
                self.wfile.write(block)
                sent += len(block)
            return resp.status
        finally:
            conn.close()


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy bytes from src to dst until either side closes."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _parse_rule(spec: str) -> FaultRule:
    """ "status=503,times=3,match=/b/" -> FaultRule; numeric fields are converted."""
    fields: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key in ("status", "drop", "times", "stall_after", "corrupt", "skip"):
            fields[key] = int(value)
        elif key in ("retry_after", "stall", "trickle"):
            fields[key] = float(value)
        else:
            fields[key] = value
    return FaultRule(**fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL of the real server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--fault", action="append", default=[], help="a rule, e.g. status=503,times=3")
    args = parser.parse_args()
    proxy = FaultProxy(args.upstream, args.host, args.port)
    for spec in args.fault:
        proxy.add(_parse_rule(spec))
    print(json.dumps({"endpoint": proxy.endpoint}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        proxy.httpd.serve_forever()


if __name__ == "__main__":
    main()
