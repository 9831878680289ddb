"""Errors the initializers raise, and secret redaction for everything they print.

`InitializerError` is an expected failure: `main` prints its one-line message to stderr and exits non-zero,
without a traceback. `TransientError` marks a failure worth retrying (connection reset, timeout, 429, 5xx).
"""

from __future__ import annotations

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
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember a secret so `redact` removes it from any text printed afterwards."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: object) -> str:
    """Return `text` as a string with every registered secret replaced by `***`."""
    out = str(text)
    for secret in sorted(_secrets, key=len, reverse=True):
        out = out.replace(secret, "***")
    return out


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
