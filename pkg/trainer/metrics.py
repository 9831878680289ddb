"""What a run reports (rank 0 only): progress lines, metrics.jsonl, summary.json and loss.png."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkg.trainer.files import atomic_file, write_atomic

if TYPE_CHECKING:
    from pkg.trainer.trackers import Reporters

log = logging.getLogger("pkg.trainer")

# Reported by DPO next to the loss: summary.json keeps their final values, loss.png plots the accuracy.
ACCURACY = ("reward_accuracy", "reward_margin")
VAL_ACCURACY = tuple(f"val_{k}" for k in ACCURACY)


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Metrics:
    """Appends one JSON record per logged step (and per validation) to output_dir/metrics.jsonl, and hands
    each to `reporters` (rank 0's report_to trackers and TrainJob status, from trackers.open_reporters)."""

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        enabled: bool,
        disk_log_dir: str = "",
        reporters: Reporters | None = None,
    ) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.disk_log: Path | None = None  # torchtune's DiskLogger file, one per run as torchtune opens it
        if enabled and disk_log_dir:
            Path(disk_log_dir).mkdir(parents=True, exist_ok=True)
            self.disk_log = Path(disk_log_dir) / f"log_{int(time.time())}.txt"
            self.disk_log.touch()
            log.info("Writing logs to %s", self.disk_log)
        self.output_dir = output_dir
        self.total_steps = total_steps
        self.enabled = enabled
        self.start = time.monotonic()
        self.start_step = 0
        self.records: list[dict[str, Any]] = []
        self.reporters = reporters
        if enabled and self.path.exists():
            self.records = read_records(self.path)

    def rewind(self, step: int) -> None:
        """Keep only the records up to `step` (a resumed run continues after it), in memory and in
        metrics.jsonl (atomically; a torn last line left by a crash goes too): one history per run."""
        self.start_step = step
        self.start = time.monotonic()
        if not self.enabled:
            return
        self.records = [r for r in self.records if r["step"] <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: finite(v) for k, v in record.items()}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.disk_log:
            # DiskLogger.log_dict's line: "Step N | name:value name:value \n"
            pairs = "".join(f"{k}:{v} " for k, v in record.items() if k not in ("step", "elapsed"))
            with self.disk_log.open("a") as f:
                f.write(f"Step {record['step']} | {pairs}\n")
        if self.reporters:
            self.reporters.log(record)

    def train_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_s: float,
        aux_loss: float | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        """`aux_loss`: an MoE router's load-balancing loss (before its coefficient), if the model has one;
        `extra`: the objective's own metrics (DPO's rewards), in the record and the progress line."""
        elapsed = self.elapsed()
        extra = extra or {}
        record = {"step": step, "loss": loss, **extra, "lr": lr, "grad_norm": grad_norm}
        aux = {} if aux_loss is None else {"aux_loss": aux_loss}
        self.log({**record, "tokens_per_s": tokens_per_s, **aux, "elapsed": elapsed})
        if self.enabled:
            done = step - self.start_step
            eta = elapsed / done * (self.total_steps - step) if done else float("inf")
            # name=value pairs: the form Katib's StdOut metrics collector reads (one metric per pair).
            log.info(
                "step %d/%d | loss=%.4f%s lr=%.3g grad_norm=%.3f tokens_per_s=%.0f | elapsed %s | eta %s",
                step,
                self.total_steps,
                loss,
                _fields(extra) + (f" aux_loss={aux_loss:.4f}" if aux else ""),
                lr,
                grad_norm,
                tokens_per_s,
                hms(elapsed),
                hms(eta),
            )

    def val_step(self, step: int, val_loss: float, extra: dict[str, float] | None = None) -> None:
        extra = extra or {}
        self.log({"step": step, "val_loss": val_loss, **extra, "elapsed": self.elapsed()})
        if self.enabled:
            log.info("step %d/%d | val_loss=%.4f%s", step, self.total_steps, val_loss, _fields(extra))

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json and loss.png; returns the summary."""
        train = [r for r in self.records if "loss" in r]
        val = [r for r in self.records if "val_loss" in r]
        summary = {
            "steps": train[-1]["step"] if train else 0,
            "first_loss": train[0]["loss"] if train else None,
            "final_loss": train[-1]["loss"] if train else None,
            "final_val_loss": val[-1]["val_loss"] if val else None,
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train) if train else None,
            **{f"final_{k}": train[-1][k] for k in ACCURACY if train and k in train[-1]},
            **{f"final_{k}": val[-1][k] for k in VAL_ACCURACY if val and k in val[-1]},
            **extra,
        }
        summary = {k: finite(v) for k, v in summary.items()}  # valid JSON, whatever went NaN
        if self.enabled:  # loss.png first: summary.json marks the run finished (checkpoint.finished_run)
            plot_loss(train, val, self.output_dir / "loss.png")
            text = json.dumps(summary, indent=2, allow_nan=False)
            write_atomic(self.output_dir / "summary.json", text + "\n")
        if self.reporters:
            self.reporters.finish(summary)
        return summary

    def close(self) -> None:
        """The run ends without finish() (an error, a stop): the trackers' runs end as failed."""
        if self.reporters:
            self.reporters.close()


def finite(value: Any) -> Any:
    """A float rounded for the record, or None for NaN and inf (which JSON cannot hold)."""
    if not isinstance(value, float):
        return value
    return round(value, 6) if math.isfinite(value) else None


def _fields(values: dict[str, float]) -> str:
    return "".join(f" {k}={v:.4f}" for k, v in values.items())


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn line (a crash mid-write) is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def plot_loss(train: list[dict], val: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = [r for r in train if "reward_accuracy" in r]
    fig, axes = plt.subplots(
        1, 2 if accuracy else 1, figsize=(12 if accuracy else 7, 4), dpi=100, squeeze=False
    )
    ax = axes[0][0]
    nan = float("nan")  # a skipped step (nan_policy: skip_step) has no loss: a gap in the line
    ax.plot(
        [r["step"] for r in train],
        [nan if r["loss"] is None else r["loss"] for r in train],
        label="train loss",
    )
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if accuracy:  # DPO: how often the chosen response out-scores the rejected one
        acc = axes[0][1]
        acc.plot([r["step"] for r in accuracy], [r["reward_accuracy"] for r in accuracy], label="train")
        scored = [r for r in val if "val_reward_accuracy" in r]
        if scored:
            acc.plot(
                [r["step"] for r in scored], [r["val_reward_accuracy"] for r in scored], "o-", label="val"
            )
        acc.set_xlabel("step")
        acc.set_ylabel("reward accuracy")
        acc.set_ylim(-0.05, 1.05)
        acc.grid(alpha=0.3)
        acc.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
