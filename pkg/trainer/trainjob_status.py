"""Progress and metrics into the TrainJob's status (Kubeflow Trainer's status server, KEP-2779).

When the TrainJobStatus feature gate is on, the controller injects into every trainer container
    KUBEFLOW_TRAINER_SERVER_URL      https://<service>.<ns>.svc:<port>/apis/trainer.kubeflow.org/v1alpha1/
                                     namespaces/<ns>/trainjobs/<name>/status
    KUBEFLOW_TRAINER_SERVER_CA_CERT  /var/run/secrets/kubeflow/trainer/ca.crt   (a file)
    KUBEFLOW_TRAINER_SERVER_TOKEN    /var/run/secrets/kubeflow/trainer/token    (a file: a projected service
                                     account token with a one-hour lifetime, rotated by the kubelet)
and the server takes `POST {"trainerStatus": {...}}` with `Authorization: Bearer <token>`, answering 200, or a
Kubernetes Status object whose `message` says what was wrong. Rank 0 reports; the other ranks never do.

A daemon thread sends: the training loop only swaps in the newest payload, so a slow, hung or hostile
server costs a step nothing. At most one request every `interval` seconds (failures back off to 5 minutes),
each with a timeout, and one warning line per kind of failure; the token never appears in a log.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("pkg.trainer")

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"

TIMEOUT_S = 5.0  # per request, as the Kubeflow SDK's update_trainjob_status
FINAL_WAIT_S = 10.0  # the most the end of a run waits for its last (100%) update
MAX_BACKOFF_S = 300.0
# The TrainJob CRD (v2.3.0) bounds: names and values 1-64 characters, at most 256 metrics, int32 seconds.
MAX_TEXT = 64
MAX_METRICS = 256
INT32_MAX = 2**31 - 1

# metrics.jsonl names -> the names users see in the TrainJob status (the progress line's names).
RENAMES = {"lr": "learning_rate"}
NOT_METRICS = {"step", "elapsed"}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)[:MAX_TEXT]


class Failure(Exception):
    """A failed update: `kind` picks the one warning line, `detail` says what happened (no secrets)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class StatusReporter:
    """Rank 0's progress reports to the status server; `update` per logged step, `finish` at the end."""

    def __init__(self, url: str, ca_cert: Path, token: Path, interval: float, total_steps: int,
                 start_step: int, steps_per_epoch: int) -> None:  # fmt: skip
        self.url, self.ca_cert, self.token_path = url, ca_cert, token
        self.interval = interval
        self.total_steps, self.start_step = max(total_steps, 1), start_step
        self.steps_per_epoch = max(steps_per_epoch, 1)
        self.started = time.monotonic()
        self.values: dict[str, str] = {}  # the newest value of every metric (val_loss stays between evals)
        self.progress = 0  # the largest percentage queued so far: what users see never goes back
        self.sent = 0  # updates the server accepted
        self._pending: dict[str, Any] | None = None
        self._final = False
        self._cond = threading.Condition()
        self._warned: set[str] = set()
        self._token: tuple[tuple | None, str] = (None, "")
        self._tls: tuple[tuple | None, ssl.SSLContext | None] = (None, None)
        self._thread = threading.Thread(target=self._run, name="trainjob-status", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the training loop's side

    def log(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record: its values join the status, its step moves the progress."""
        for key, value in record.items():
            if key not in NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool):
                self.values[RENAMES.get(key, key)[:MAX_TEXT]] = _value(value)
        step = int(record.get("step", 0))
        done = step - self.start_step
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total_steps - step) if done > 0 else None
        # 100 only once the run has written its outputs (finish): a run at its last step is still saving.
        self._queue(min(99, 100 * step // self.total_steps), eta, step)

    def finish(self) -> None:
        """The final update (100%, no time left), waited for at most FINAL_WAIT_S; then the sender stops."""
        self._queue(100, 0, self.total_steps, final=True)
        self._thread.join(FINAL_WAIT_S)

    def close(self) -> None:
        """Stop without a final update (a failed or interrupted run)."""
        with self._cond:
            self._final = True
            self._pending = None
            self._cond.notify()

    def _queue(self, progress: int, eta: float | None, step: int, final: bool = False) -> None:
        self.progress = max(self.progress, progress)
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        epoch = min(epochs, step // self.steps_per_epoch + (step % self.steps_per_epoch > 0))
        values = {**self.values, "step": str(step), "total_steps": str(self.total_steps)}
        values |= {"epoch": str(epoch), "total_epochs": str(epochs)}
        status: dict[str, Any] = {"progressPercentage": self.progress}
        if eta is not None and math.isfinite(eta):
            status["estimatedRemainingSeconds"] = min(INT32_MAX, max(0, round(eta)))
        status["metrics"] = [{"name": k, "value": v} for k, v in list(values.items())[:MAX_METRICS]]
        with self._cond:
            if self._final:
                return
            self._pending = status
            self._final = final
            self._cond.notify()

    # ------------------------------------------------------------ the sender thread

    def _run(self) -> None:
        wait = 0.0
        failures = 0
        while True:
            with self._cond:
                deadline = time.monotonic() + wait
                # Sleep out the interval (or the backoff) unless the final update arrives.
                while not self._final and (self._pending is None or time.monotonic() < deadline):
                    self._cond.wait(max(0.05, deadline - time.monotonic()) if self._pending else None)
                status, final = self._pending, self._final
                self._pending = None
            if status is None:
                return
            try:
                self._send(status)
                failures, wait = 0, self.interval
                self.sent += 1
            except Failure as failure:
                failures += 1
                wait = min(MAX_BACKOFF_S, self.interval * 2**failures)
                if failure.kind not in self._warned:
                    self._warned.add(failure.kind)
                    log.warning("TrainJob status: %s (progress updates go on being tried, quietly)", failure)
            except Exception as exc:  # never let a surprise end the thread with a traceback
                failures += 1
                wait = MAX_BACKOFF_S
                if "unexpected" not in self._warned:
                    self._warned.add("unexpected")
                    log.warning("TrainJob status: update failed: %s: %s", type(exc).__name__, exc)
            if final:
                return

    def _bearer(self) -> str:
        """The token, re-read whenever the file changes (the kubelet rotates projected tokens)."""
        stamp = _stamp(self.token_path)
        if stamp is None:
            raise Failure("token", f"cannot read the token file {self.token_path} ({ENV_TOKEN})")
        if stamp != self._token[0]:
            try:
                self._token = (stamp, self.token_path.read_text().strip())
            except (OSError, UnicodeDecodeError) as exc:
                raise Failure("token", f"cannot read the token file {self.token_path}: {exc}") from None
        if not self._token[1]:
            raise Failure("token", f"the token file {self.token_path} ({ENV_TOKEN}) is empty")
        return self._token[1]

    def _context(self) -> ssl.SSLContext:
        stamp = _stamp(self.ca_cert)
        if stamp is None or stamp != self._tls[0]:
            try:
                self._tls = (stamp, ssl.create_default_context(cafile=str(self.ca_cert)))
            except (OSError, ssl.SSLError) as exc:
                raise Failure("ca", f"cannot use the CA file {self.ca_cert} ({ENV_CA_CERT}): {exc}") from None
        assert self._tls[1] is not None
        return self._tls[1]

    def _send(self, status: dict[str, Any]) -> None:
        status = {
            **status,
            "lastUpdatedTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        body = json.dumps({"trainerStatus": status}).encode()
        headers = {"Authorization": f"Bearer {self._bearer()}", "Content-Type": "application/json"}
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self._context()) as response:
                response.read(65536)
        except urllib.error.HTTPError as exc:
            raise _http_failure(exc) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLError):
                raise Failure("tls", f"TLS with {self.url} failed ({_ssl_reason(reason)}); the server's "
                              f"certificate must be signed by {self.ca_cert}") from None  # fmt: skip
            raise Failure("unreachable", f"cannot reach {self.url}: {reason}") from None
        except ssl.SSLError as exc:
            raise Failure("tls", f"TLS with {self.url} failed ({_ssl_reason(exc)})") from None
        except TimeoutError:
            raise Failure("unreachable", f"{self.url} did not answer within {TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise Failure("unreachable", f"cannot reach {self.url}: {exc}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)


def _http_failure(exc: urllib.error.HTTPError) -> Failure:
    """The server's own message (a Kubernetes Status object), cut short and on one line."""
    try:
        raw = exc.read(4096).decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        message = str(json.loads(raw).get("message") or "")
    except (ValueError, AttributeError):
        message = raw
    message = " ".join(message.split())[:200]
    said = f": {message}" if message else ""
    if exc.code in (401, 403):
        return Failure("auth", f"the status server refused the token (HTTP {exc.code}{said}); the TrainJob's "
                       "service account token must carry the audience the controller set")  # fmt: skip
    if 400 <= exc.code < 500:
        return Failure(f"http {exc.code}", f"the status server rejected an update (HTTP {exc.code}{said})")
    return Failure("server", f"the status server failed (HTTP {exc.code}{said})")


def from_env(
    interval: float, total_steps: int, start_step: int, steps_per_epoch: int
) -> StatusReporter | None:
    """A reporter when the controller injected the three variables; None (and one line why) otherwise."""
    names = (ENV_URL, ENV_CA_CERT, ENV_TOKEN)
    values = [os.environ.get(n, "").strip() for n in names]
    if not any(values):
        return None
    missing = [n for n, v in zip(names, values, strict=True) if not v]
    if missing:
        log.warning("TrainJob status: %s not set, so no progress is reported there", ", ".join(missing))
        return None
    url, ca_cert, token = values
    if not url.startswith("https://"):
        log.warning("TrainJob status: %s must be an https:// URL, got %r; no progress reported", ENV_URL, url)
        return None
    log.info("TrainJob status: progress every %g s to %s", interval, url)
    return StatusReporter(url, Path(ca_cert), Path(token), interval, total_steps, start_step, steps_per_epoch)
