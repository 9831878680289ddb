"""A container's main process, shared by the initializers and the model exporter: SIGTERM (Kubernetes stopping
the pod) ends it cleanly, an expected error is one line, and each outcome has its exit code."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable

from .errors import InitializerError, one_line, redact


class Terminated(BaseException):
    """SIGTERM arrived (the pod is being stopped)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run_main(body: Callable[[], None], on_interrupt: str) -> int:
    """Run `body`; the exit code: 0, an InitializerError's own, 143 on SIGTERM, 130 on Ctrl-C, 2 for a bug.

    on_interrupt: what a rerun does with the work done so far, said after "interrupted; ".
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        body()
        return 0
    except InitializerError as exc:
        print(f"error: {one_line(exc, 1000)}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"error: interrupted; {on_interrupt}", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a bug: keep the trace for the report, minus secrets
        print(redact(traceback.format_exc()), file=sys.stderr, flush=True)
        print(f"error: unexpected {type(exc).__name__}: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
