"""The one retry loop of every request the initializers make (listings, heads, downloads, parts).

Capped exponential backoff with jitter, or the server's Retry-After, on TransientError only (connection
errors, stalled or trickling reads, 429, 5xx); anything else fails at once. A module of its own so that the
sources and the transfer engine both use it without importing each other.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .config import Tuning
from .errors import InitializerError, TransientError, one_line
from .progress import log

T = TypeVar("T")


class Cancelled(Exception):
    """The run is stopping (another task failed, its reads were aborted): stop quietly, no retry."""


def retry(
    fn: Callable[[], T],
    what: str,
    tuning: Tuning,
    on_retry: Callable[[], None] | None = None,
    cancel: threading.Event | None = None,
) -> T:
    """Call `fn`, retrying TransientError with capped exponential backoff and jitter (or Retry-After)."""
    for attempt in range(1, tuning.max_attempts + 1):
        try:
            return fn()
        except TransientError as exc:
            if cancel is not None and cancel.is_set():
                raise Cancelled() from None  # the run is stopping (its reads were aborted): no retry
            if attempt == tuning.max_attempts:
                raise InitializerError(
                    f"{what}: still failing after {attempt} attempts ({one_line(exc)}); "
                    "check the endpoint and network, then rerun (finished files are kept)"
                ) from None
            if exc.retry_after is not None:
                delay = min(exc.retry_after, tuning.retry_cap)
            else:
                delay = min(tuning.retry_base * 2 ** (attempt - 1), tuning.retry_cap) * random.uniform(
                    0.5, 1.0
                )
            log(f"retry {attempt}/{tuning.max_attempts - 1} of {what} in {delay:.1f}s: {one_line(exc, 200)}")
            if on_retry:
                on_retry()
            if cancel is not None and cancel.wait(delay):
                raise Cancelled() from None
            if cancel is None:
                time.sleep(delay)
    raise AssertionError("unreachable")
