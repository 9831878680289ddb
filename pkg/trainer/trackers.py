"""Where rank 0's metrics go besides metrics.jsonl: `report_to` trackers and the TrainJob status.

    report_to: [tensorboard, mlflow, wandb]

- tensorboard: event files under output_dir/tensorboard (or `tensorboard_dir`): every logged value per step,
  the config and the summary as text.
- mlflow: the run in MLFLOW_TRACKING_URI's `experiment_name` experiment: the config as params, the values
  per step as metrics; at the end summary.json, loss.png, config.yaml and the adapter as artifacts (a full
  model is not uploaded: the run's `model_path` tag says where it is on the volume), and with
  `mlflow_register_as` the adapter or model as a new version of that registered model.
- wandb: a W&B run (WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT or `experiment_name`), files under
  output_dir/wandb; the config, the values per step and the summary.

A resumed job continues the same MLflow and W&B runs: their ids travel in the checkpoint.

Each tracker runs on a thread of its own, so a slow or hung server never holds up a step. One that cannot
start says so in one line and the run goes on without it (`report_strict: true` stops the run instead);
one that fails later says so once and is dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pkg.trainer import trainjob_status
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import ConfigError

log = logging.getLogger("pkg.trainer")

TRACKERS = ("tensorboard", "mlflow", "wandb")
START_WAIT_S = 60.0  # a tracker that has not started by then is left behind
FINISH_WAIT_S = 600.0  # uploading the artifacts at the end
QUEUE = 10_000  # pending calls per tracker before new ones are dropped (a server far slower than the steps)
NOT_VALUES = {"step", "elapsed"}


def numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric values of a metrics.jsonl record, under its names."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in NOT_VALUES and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def flat_config(cfg: TrainConfig) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in cfg.to_dict().items()}


class Tracker:
    """One destination. Its methods run on its worker thread, never on the training loop's."""

    name = ""

    def __init__(self, cfg: TrainConfig, start_step: int, resumed_id: str | None) -> None:
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.start_step, self.resumed_id = start_step, resumed_id
        self.run_id: str | None = None  # kept in the checkpoint, so a resumed job continues this run

    def start(self) -> None: ...

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """The run failed or was stopped: end without the final artifacts."""

    def describe(self, exc: Exception) -> str:
        """A failure in one line for the log."""
        if isinstance(exc, ImportError):
            return f"{exc.name} is not installed in this image (pkg/trainer/requirements-trackers.txt)"
        return _one_line(exc)


class TensorBoard(Tracker):
    name = "tensorboard"

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(self.cfg.tensorboard_dir or self.out / "tensorboard")
        # A resumed run drops the events its previous attempt wrote after the checkpoint's step.
        self.writer = SummaryWriter(str(folder), purge_step=self.start_step + 1 if self.start_step else None)
        self.writer.add_text("config", _markdown(flat_config(self.cfg)), global_step=0)
        self.writer.flush()
        log.info("tensorboard: event files in %s", folder)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", _markdown(summary), global_step=int(summary.get("steps") or 0))
        self.writer.close()

    def close(self) -> None:
        self.writer.close()


class MLflow(Tracker):
    name = "mlflow"

    def start(self) -> None:
        # MLflow retries a failed request 7 times over minutes and waits 120 s for an answer by default: a
        # down server would keep this thread busy long after the run ended. The user's settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        self.uri = _redact(uri)  # what messages show: never a password in the URL
        if not uri:
            raise ConfigError("MLFLOW_TRACKING_URI is not set: point it at the MLflow tracking server")
        # urllib3's retry lines and MLflow's own notes would repeat what the one warning line says.
        for name in ("urllib3", "mlflow"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from mlflow import MlflowClient

        self.client = MlflowClient(uri)
        try:
            self.open_run()
        except Exception as exc:
            raise RuntimeError(self.describe(exc)) from None

    def describe(self, exc: Exception) -> str:
        """MLflow's errors quote whole URLs and urllib3's retry history: say what happened instead."""
        text = str(exc)
        if "Connection refused" in text or "Failed to establish a new connection" in text:
            return f"cannot reach {self.uri} (connection refused)"
        if "timed out" in text.lower():
            return f"{self.uri} did not answer in time"
        if "Name or service not known" in text or "nodename nor servname" in text:
            return f"cannot resolve the host of {self.uri}"
        return super().describe(exc)

    def open_run(self) -> None:
        from mlflow.entities import Param

        client = self.client
        from mlflow.exceptions import MlflowException

        run = None
        if self.resumed_id:
            try:
                run = client.get_run(self.resumed_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is None or run.info.lifecycle_stage != "active":
                log.warning("mlflow: run %s of the checkpoint is gone; a new run starts", self.resumed_id)
                run = None
            else:
                client.update_run(run.info.run_id, status="RUNNING")
        if run is None:
            name = self.cfg.experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=self.cfg.run_name or None)
        self.run_id = run.info.run_id
        # Params are write-once in MLflow: a resumed run adds the new keys and keeps the first values.
        known = run.data.params
        params = [Param(k, v[:6000]) for k, v in flat_config(self.cfg).items() if k not in known]
        for i in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[i : i + 100])
        log.info("mlflow: run %s (%s) at %s", run.info.run_name, self.run_id, self.uri)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, summary: dict[str, Any]) -> None:
        client, run_id = self.client, self.run_id
        for name in ("summary.json", "loss.png", "config.yaml"):
            if (self.out / name).is_file():
                client.log_artifact(run_id, str(self.out / name))
        adapter, model = self.out / "adapter", self.out / "model"
        if adapter.is_dir():
            client.log_artifacts(run_id, str(adapter), "adapter")
        if model.is_dir():
            client.set_tag(run_id, "model_path", str(model.resolve()))
        if self.cfg.mlflow_register_as:
            self.register(adapter if adapter.is_dir() else model)
        client.set_terminated(run_id, "FINISHED")

    def register(self, folder: Path) -> None:
        """A new version of the registered model: the adapter, or the full model (uploaded for this)."""
        from mlflow.exceptions import MlflowException

        client, name = self.client, self.cfg.mlflow_register_as
        if folder.name == "model":
            client.log_artifacts(self.run_id, str(folder), "model")
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, f"runs:/{self.run_id}/{folder.name}", self.run_id, await_creation_for=60
        )
        log.info("mlflow: registered %s version %s (%s)", name, version.version, folder.name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


class WandB(Tracker):
    name = "wandb"

    def start(self) -> None:
        import wandb

        self.out.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True, init_timeout=START_WAIT_S - 10)
        self.run = wandb.init(
            project=self.cfg.experiment_name or None,  # None: WANDB_PROJECT, else W&B's default
            name=self.cfg.run_name or None,
            id=self.resumed_id,
            resume="allow" if self.resumed_id else None,
            dir=str(self.out),
            config=self.cfg.to_dict(),
            settings=settings,
        )
        self.run_id = self.run.id
        log.info("wandb: run %s (%s), mode %s", self.run.name, self.run.id, self.run.settings.mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        self.run.finish()

    def close(self) -> None:
        self.run.finish(exit_code=1)


KINDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Worker:
    """Runs one tracker's calls in order on a daemon thread. The first failure is said in one line and
    ends the tracker (no retry storm against a server that is down)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.calls: queue.Queue[Callable[[], None] | None] = queue.Queue(QUEUE)
        self.failed = False
        self.error = ""  # the failure, in one line
        self.starting = True  # a failure to start is told by open_reporters, which knows report_strict
        self.dropped = False
        self.thread = threading.Thread(target=self._run, name=f"tracker-{tracker.name}", daemon=True)
        self.thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            self.calls.put_nowait(call)
        except queue.Full:
            if not self.dropped:
                self.dropped = True
                log.warning(
                    "%s: the server is slower than training; some values are not sent", self.tracker.name
                )

    def wait(self, timeout: float) -> bool:
        """True once every call submitted so far has run (or the tracker failed) within `timeout`."""
        done = threading.Event()
        with contextlib.suppress(queue.Full):
            self.calls.put_nowait(done.set)
        end = time.monotonic() + timeout
        while not done.wait(0.05):
            if self.failed or time.monotonic() > end:
                return self.failed
        return True

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self.calls.put_nowait(None)

    def _run(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.failed and not isinstance(getattr(call, "__self__", None), threading.Event):
                continue
            try:
                call()
            except Exception as exc:  # a tracker's failure is never the run's
                self.failed, self.error = True, self.tracker.describe(exc)
                if not self.starting:
                    log.warning("%s: %s; the run goes on without it", self.tracker.name, self.error)


def _redact(uri: str) -> str:
    """The URI without user:password@."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _markdown(values: Mapping[str, Any]) -> str:
    """key: value lines as a Markdown code block (TensorBoard's text dashboard renders Markdown)."""
    return "\n".join(f"    {k}: {v}" for k, v in values.items())


class Reporters:
    """Every destination of rank 0's records: the trackers of `report_to` and the TrainJob status."""

    def __init__(self, workers: list[Worker], status: trainjob_status.StatusReporter | None) -> None:
        self.workers, self.status = workers, status
        self.done = False

    def ids(self) -> dict[str, str]:
        """{tracker: run id} for the checkpoint."""
        return {w.tracker.name: w.tracker.run_id for w in self.workers if w.tracker.run_id and not w.failed}

    def log(self, record: Mapping[str, Any]) -> None:
        values, step = numbers(record), int(record.get("step", 0))
        for worker in self.workers:
            worker.submit(lambda w=worker: w.tracker.log(step, values))
        if self.status:
            self.status.log(record)

    def finish(self, summary: dict[str, Any]) -> None:
        """After the outputs are written: artifacts, registry, the final 100%; waits (bounded) for them."""
        self.done = True
        for worker in self.workers:
            worker.submit(lambda w=worker: w.tracker.finish(summary))
        if self.status:
            self.status.finish()
        deadline = time.monotonic() + FINISH_WAIT_S
        for worker in self.workers:
            if not worker.wait(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "%s: still busy after %.0f s; the run ends without it", worker.tracker.name, FINISH_WAIT_S
                )
            worker.stop()

    def close(self) -> None:
        """The run did not finish: end the runs as failed, waiting briefly."""
        if self.done:
            return
        self.done = True
        for worker in self.workers:
            worker.submit(worker.tracker.close)
            worker.wait(10.0)
            worker.stop()
        if self.status:
            self.status.close()


def open_reporters(cfg: TrainConfig, total_steps: int, start_step: int, steps_per_epoch: int,
                   resumed: Mapping[str, str]) -> Reporters:  # fmt: skip
    """Start the trackers of `report_to` (in parallel, each waited for at most START_WAIT_S) and the
    TrainJob status reporter. A tracker that cannot start is left out after one line, or with
    `report_strict` raises ConfigError."""
    workers = []
    for name in cfg.report_to:
        workers.append(Worker(KINDS[name](cfg, start_step, resumed.get(name))))
    for worker in workers:
        worker.submit(worker.tracker.start)
    deadline = time.monotonic() + START_WAIT_S
    started = []
    for worker in workers:
        done = worker.wait(max(0.0, deadline - time.monotonic()))
        worker.starting = False
        if done and not worker.failed:
            started.append(worker)
            continue
        worker.failed = True  # a late start must not begin sending
        worker.stop()
        why = worker.error if done else f"no answer within {START_WAIT_S:.0f} s"
        if cfg.report_strict:
            raise ConfigError(f"report_to {worker.tracker.name}: {why} (report_strict: true stops the run)")
        log.warning("%s: %s; the run goes on without it", worker.tracker.name, why)
    status = trainjob_status.from_env(cfg.status_interval, total_steps, start_step, steps_per_epoch)
    return Reporters(started, status)
