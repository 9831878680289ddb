"""Progress for `kubectl logs`: a line every few seconds (files, bytes, MB/s, ETA); a bar only on a TTY."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from .errors import redact


def log(message: str, stream: TextIO | None = None) -> None:
    """Print one timestamped, redacted line (a newline from a server's text cannot start a forged one)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = redact(message).replace("\n", "\\n")
    print(f"{stamp} {line}", file=stream or sys.stdout, flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Thread-safe counters plus a reporter thread; `close()` prints nothing, the caller logs the summary."""

    def __init__(self, total_files: int, total_bytes: int, interval: float, stream: TextIO | None = None):
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files_done = 0
        self.bytes_done = 0
        self.retries = 0
        self.started = time.monotonic()
        self._interval = interval
        self._stream = stream or sys.stdout
        self._tty = self._stream.isatty()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> Progress:
        self._thread.start()
        return self

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_done += n

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        with self._lock:
            files, done = self.files_done, self.bytes_done
        rate = done / self.elapsed()
        left = max(self.total_bytes - done, 0)
        eta = human_seconds(left / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        return (
            f"progress: {files}/{self.total_files} files, "
            f"{human_bytes(done)}/{human_bytes(self.total_bytes)} ({pct:.0f}%), "
            f"{rate / 1e6:.1f} MB/s, ETA {eta}"
        )

    def _run(self) -> None:
        tick = min(self._interval, 0.5) if self._tty else self._interval
        last = time.monotonic()
        while not self._stop.wait(tick):
            if self._tty:
                pct = self.bytes_done / self.total_bytes if self.total_bytes else 1.0
                bar = "#" * int(30 * pct)
                print(f"\r[{bar:<30}] {self.line()}", end="", file=self._stream, flush=True)
            elif time.monotonic() - last >= self._interval - 0.01:
                log(self.line(), self._stream)
                last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._tty:
            print(file=self._stream, flush=True)
