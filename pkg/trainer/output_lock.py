"""One job per output_dir: a lock file holding the job's host, pid and a lease the job keeps renewing.

Two jobs on one output_dir (a retried pod beside a live one, two TrainJobs given the same volume) would
resume each other's checkpoints, delete each other's temporary folders and mix both runs' outputs. POSIX
locks do not hold across the nodes of a ReadWriteMany volume everywhere (some NFS and CSI setups ignore
them), so the lock is a plain file, `output_dir/.trainer.lock`: created with O_EXCL (atomic on NFS v3+ and
every local filesystem), JSON `{host, pid, token, renewed, lease_s}`, rewritten by a thread of the holder
every lease/4 seconds. A job that finds it:

- from a process of this host that no longer exists (torchrun restarting its workers, a rerun in the same
  pod): takes it over at once;
- renewed longer than two leases ago by the clock: takes it over at once, with a line;
- otherwise waits up to one lease, reading it: renewed meanwhile -> refuses in one line naming the host and
  pid; not renewed (its job died without releasing it) -> takes it over, with a line.

Watching for a renewal, rather than comparing timestamps, keeps the decision right across nodes whose
clocks disagree. Two jobs taking over the same stale lock at once both write it; the holder's renewal finds
the other's token, and :meth:`OutputLock.lost` then stops the job that lost at its next checkpoint or export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pkg.trainer.errors import TrainerError
from pkg.trainer.files import write_atomic

log = logging.getLogger("pkg.trainer")

NAME = ".trainer.lock"
LEASE_S = 60.0  # a job that died holding the lock blocks the next one this long at most


class OutputLock:
    """The lock of one output_dir, held by global rank 0 from setup to the end of the run."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / NAME
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # ------------------------------------------------------------ acquire / release

    def acquire(self) -> OutputLock:
        """Take the lock (waiting out a lease whose holder may be dead), or raise a line naming the holder."""
        while not self._create():
            holder = self._read()
            if holder is None:  # released (or torn) meanwhile: try again
                self._remove_if(None)
                continue
            verdict = self._judge(holder)
            if verdict == "live":
                raise TrainerError(self._in_use(holder))
            log.warning(
                "output_dir %s: taking over the lock of host %s pid %s, %s",
                self.path.parent, holder.get("host"), holder.get("pid"), verdict,
            )  # fmt: skip
            self._write()
            break
        self._thread = threading.Thread(target=self._renew_loop, name="output-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def lost(self) -> str | None:
        """One line when another job has taken the lock over since (then this job must stop), else None."""
        return self._lost

    # ------------------------------------------------------------ internals

    def _content(self) -> str:
        lock = {"host": self.host, "pid": os.getpid(), "token": self.token, "renewed": time.time()}
        return json.dumps({**lock, "lease_s": LEASE_S}) + "\n"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _write(self) -> None:
        write_atomic(self.path, self._content())

    def _read(self) -> dict | None:
        try:
            found = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def _remove_if(self, holder: dict | None) -> None:
        """Remove a torn lock file (one that cannot be read) so the next create can succeed."""
        if holder is None and self.path.exists() and self._read() is None:
            time.sleep(0.2)  # a holder may be between creating it and writing it
            if self._read() is None:
                with contextlib.suppress(OSError):
                    self.path.unlink()

    def _judge(self, holder: dict) -> str:
        """'live', or why the holder is gone (the words of the takeover line)."""
        lease = float(holder.get("lease_s") or LEASE_S)
        age = time.time() - float(holder.get("renewed") or 0)
        if holder.get("host") == self.host:
            pid = int(holder.get("pid") or 0)
            if pid != os.getpid() and _alive(pid) and age <= 2 * lease:
                return "live"
            if pid == os.getpid() or not _alive(pid):
                return "whose process is gone"
        if age > 2 * lease:
            return f"not renewed for {age:.0f} s"
        log.info(
            "output_dir %s is locked by host %s pid %s: waiting up to %.0f s to see whether that job lives",
            self.path.parent, holder.get("host"), holder.get("pid"), lease,
        )  # fmt: skip
        deadline = time.monotonic() + lease * 1.25
        while time.monotonic() < deadline:
            time.sleep(min(1.0, lease / 8))
            now = self._read()
            if now is None or now.get("token") != holder.get("token"):
                return "released meanwhile"
            if now.get("renewed") != holder.get("renewed"):
                return "live"
        return f"not renewed within its {lease:.0f} s lease"

    def _in_use(self, holder: dict) -> str:
        age = time.time() - float(holder.get("renewed") or 0)
        return (
            f"output_dir {self.path.parent} is in use by another job (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, lock {self.path} renewed {max(age, 0):.0f} s ago): give this job its own "
            f"output_dir, or stop the other one (a lock whose job died is taken over after "
            f"{float(holder.get('lease_s') or LEASE_S):.0f} s)"
        )

    def _renew_loop(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            holder = self._read()
            if holder is not None and holder.get("token") != self.token:
                self._lost = (
                    f"another job (host {holder.get('host')}, pid {holder.get('pid')}) took over the lock of "
                    f"output_dir {self.path.parent}: this job stops; run one job per output_dir"
                )
                return
            with contextlib.suppress(OSError):  # a passing hiccup of the volume: the next renewal retries
                self._write()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
