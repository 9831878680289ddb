"""Errors the initializers raise, and secret redaction for everything they print.

`InitializerError` is an expected failure: `main` prints its one-line message to stderr and exits non-zero,
without a traceback. `TransientError` marks a failure worth retrying (connection reset, timeout, 429, 5xx).
"""

from __future__ import annotations

import re
import threading


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


def redact(text: object) -> str:
    """Return `text` as a string with every registered secret, whole or in part, replaced by `***`, and
    control characters (but newlines and tabs) escaped."""
    out = str(text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
        pieces = _pieces if _pieces else None  # only ever grows; .get is safe while another thread adds
    for secret in secrets:
        out = out.replace(secret, "***")
    if pieces:
        out = _redact_pieces(out, pieces)
    return escape_controls(out)


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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form; HTTP dates are rare for these servers)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def untrusted_certificate(exc: BaseException, where: str) -> InitializerError | None:
    """A one-line fix for a TLS certificate that no trusted CA signed, or None for other errors: retrying
    cannot help, so this is not a TransientError."""
    if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
        return None
    return InitializerError(
        f"the TLS certificate of {where} is not trusted (CERTIFICATE_VERIFY_FAILED): if it is signed by a "
        "private CA, mount the CA bundle and set SSL_CERT_FILE (or AWS_CA_BUNDLE for S3) to its path"
    )
