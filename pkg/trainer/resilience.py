"""Surviving preemption: turn SIGTERM (and Ctrl-C's SIGINT) into "checkpoint now, then exit non-zero".

Kubernetes evicts a pod by sending SIGTERM to its main process (torchrun, which forwards it to
every worker) and SIGKILLs it after the grace period (30 s by default). The handler only sets a
flag; the training loop calls :meth:`StopRequest.should_stop` after each optimizer step, where all
ranks agree through one all_reduce (a rank that got the signal late, or not at all, still stops at
the same step, so no rank waits forever in a collective), save a checkpoint and exit with
:data:`EXIT_PREEMPTED` so the Job is retried and resumes.

A rank that dies outright (SIGKILL, OOM) is torchrun's job: with ``--max-restarts N`` it restarts
the whole group, which resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType

from pkg.trainer import distributed
from pkg.trainer.errors import TrainerError

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM'd process


class Preempted(TrainerError):
    """Stopped by a signal after saving a checkpoint: a retry of the same job resumes from it."""

    exit_code = EXIT_PREEMPTED


class StopRequest:
    """Remembers a termination signal until the loop reaches a safe point to act on it."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Install the handlers (main thread only); returns self for ``stop = StopRequest().install()``."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def describe(self) -> str:
        """The signal's name, for the log line ("SIGTERM"), or who asked when it came to another rank."""
        return signal.Signals(self.received).name if self.received else "a signal to another rank"

    @property
    def requested(self) -> bool:
        """This process got a signal (local; use :meth:`should_stop` to decide in a distributed run)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank if any rank got a signal; collective (all ranks call it at the same point)."""
        return distributed.any_rank(self.requested)
