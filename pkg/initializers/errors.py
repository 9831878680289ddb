"""Errors the initializers raise, and secret redaction for everything they print.

`InitializerError` is an expected failure: `main` prints its one-line message to stderr and exits non-zero,
without a traceback. `TransientError` marks a failure worth retrying (connection reset, timeout, 429, 5xx).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from urllib.parse import urlsplit


class InitializerError(Exception):
    """An expected failure with a one-line message that says what is wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TransientError(Exception):
    """A failure the transfer engine retries; `retry_after` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RangeIgnored(Exception):
    """The server at `host` answered a ranged GET with the whole file (HTTP 200, as RFC 9110 allows): the
    engine downloads that file, and later large files from that host, in one stream each."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} ignores Range requests")
        self.host = host


_secrets: set[str] = set()
# Every run of PIECE characters of a secret -> the secrets it occurs in: a server that echoes part of a token
# (its first 30 characters, say) is redacted too. Shorter secrets are only redacted whole.
PIECE = 12
_pieces: dict[str, set[str]] = {}
_lock = threading.Lock()
# C0 / C1 control characters other than tab and newline: a server's text must not move the cursor, clear
# the screen or forge log lines in a terminal or a log viewer.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def register_secret(value: str | None) -> None:
    """Remember a secret so `redact` removes it (and any PIECE characters of it) from text printed later."""
    if value and len(value) >= 4:
        with _lock:
            if value in _secrets:
                return
            _secrets.add(value)
            for i in range(len(value) - PIECE + 1):
                _pieces.setdefault(value[i : i + PIECE], set()).add(value)


# A secret is masked where it stands as a value of its own: not where its text is part of a longer word
# (a short secret such as "SECRET" inside SECRET_ACCESS_KEY). A percent-escape before it (`%3D`, `%20`)
# is a boundary too: URL-encoded text still hides it.
_WORD = re.compile(r"[A-Za-z0-9_]")
_ESCAPE_BEFORE = re.compile(r"%[0-9A-Fa-f]{2}$")


def _stands_alone(text: str, start: int, end: int) -> bool:
    before_ok = start == 0 or not _WORD.match(text[start - 1]) or bool(_ESCAPE_BEFORE.search(text, 0, start))
    return before_ok and (end == len(text) or not _WORD.match(text[end]))


def redact(text: object) -> str:
    """Return `text` as a string with every registered secret, whole or a run of PIECE characters of it,
    replaced by `***` where it stands as a value of its own, and control characters (but newlines and
    tabs) escaped."""
    out = str(text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
        pieces = _pieces if _pieces else None  # only ever grows; .get is safe while another thread adds
    for secret in secrets:
        out = _redact_whole(out, secret)
    if pieces:
        out = _redact_pieces(out, pieces)
    return escape_controls(out)


def _redact_whole(text: str, secret: str) -> str:
    at = text.find(secret)
    while at >= 0:
        end = at + len(secret)
        if _stands_alone(text, at, end):
            text = text[:at] + "***" + text[end:]
            end = at + 3
        at = text.find(secret, end)
    return text


def _redact_pieces(text: str, pieces: dict[str, set[str]]) -> str:
    i = 0
    while i + PIECE <= len(text):
        found = pieces.get(text[i : i + PIECE])
        if not found:
            i += 1
            continue
        start, end = i, i + PIECE
        for secret in tuple(found):  # grow the match as far as the text keeps following this secret
            at = secret.find(text[i : i + PIECE])
            while at >= 0:
                left, right = i, i + PIECE
                s_left, s_right = at, at + PIECE
                while left > 0 and s_left > 0 and text[left - 1] == secret[s_left - 1]:
                    left, s_left = left - 1, s_left - 1
                while right < len(text) and s_right < len(secret) and text[right] == secret[s_right]:
                    right, s_right = right + 1, s_right + 1
                start, end = min(start, left), max(end, right)
                at = secret.find(text[i : i + PIECE], at + 1)
        if not _stands_alone(text, start, end):
            i = max(i + 1, end - PIECE + 1)
            continue
        text = text[:start] + "***" + text[end:]
        i = start + 3
    return text


def escape_controls(text: str) -> str:
    """Control characters (but newline and tab) as visible \\xNN escapes."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: object, limit: int = 400) -> str:
    """Squash a (possibly multi-line, library-made) message into one redacted line."""
    line = " ".join(redact(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def volume_error(path: object, exc: OSError, verb: str = "write") -> InitializerError:
    """A one-line fix for an OUTPUT_PATH this process cannot use, naming the uid it runs as and fsGroup."""
    if exc.errno == errno.EROFS:
        return InitializerError(f"cannot {verb} {path}: the volume is mounted read-only; mount it read-write")
    uid, gid = os.getuid(), os.getgid()
    return InitializerError(
        f"cannot {verb} {path} ({exc.strerror}): the initializer runs as uid {uid} gid {gid}: on Kubernetes "
        f"set the pod's securityContext.fsGroup: {gid} (the llm-* runtimes do), with docker or podman make "
        f"the host folder writable by it (chown {uid}:{gid} FOLDER)"
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; HTTP dates are rare for these servers)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# What a TLS client's handshake reports when the server answered in plain HTTP (OpenSSL 1.1 to 3.x).
_PLAIN_ANSWER = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")
# What TLS servers answer a plain-HTTP request with: Go (rclone, MinIO), nginx, and raw TLS alert records
# (0x15 0x03) where a status line should be.
_TLS_ANSWER = (
    "HTTP request to an HTTPS server",
    "plain HTTP request was sent to HTTPS port",
    "\x15\x03",
    "\\x15\\x03",  # the same, as repr() shows it
)


def tls_failure(exc: BaseException, origin: str) -> InitializerError | None:
    """A one-line fix for a TLS problem talking to `origin` (scheme://host[:port]), or None for other errors.
    Retrying cannot fix any of them, so none is a TransientError: an untrusted certificate, an https:// URL
    whose server speaks plain HTTP, or an http:// URL whose server speaks TLS."""
    text = f"{exc} {exc!r}"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return InitializerError(
            f"the TLS certificate of {origin} is not trusted (CERTIFICATE_VERIFY_FAILED): if it is signed "
            "by a private CA, mount the CA bundle and set SSL_CERT_FILE (or AWS_CA_BUNDLE for S3) to its path"
        )
    if origin.startswith("https://") and any(mark in text.upper() for mark in _PLAIN_ANSWER):
        return speaks(origin, "plain HTTP")
    if origin.startswith("http://") and any(mark in text for mark in _TLS_ANSWER):
        return speaks(origin, "TLS")
    return None


def tls_answer(status: int, body: bytes | str, url: str) -> InitializerError | None:
    """For an error answer to an http:// request: the fix when it is a TLS server's complaint, else None."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if status != 400 or not url.startswith("http://") or not any(m in text for m in _TLS_ANSWER):
        return None
    return speaks(origin_of(url), "TLS")


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL, without any login, path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def speaks(origin: str, protocol: str) -> InitializerError:
    """The server at `origin` answered in the other protocol than its URL's scheme says."""
    scheme, _, rest = origin.partition("://")
    other = "http" if scheme == "https" else "https"
    return InitializerError(
        f"{origin} speaks {protocol}, not {'TLS' if scheme == 'https' else 'plain HTTP'}: "
        f"write its URL as {other}://{rest} (in ENDPOINT or HF_ENDPOINT)"
    )
