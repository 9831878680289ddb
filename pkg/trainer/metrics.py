"""What a run reports (rank 0 only): progress lines, metrics.jsonl, summary.json and loss.png."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("pkg.trainer")


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Metrics:
    """Appends one JSON record per logged step (and per validation) to output_dir/metrics.jsonl."""

    def __init__(self, output_dir: Path, total_steps: int, enabled: bool) -> None:
        self.path = output_dir / "metrics.jsonl"
        self.output_dir = output_dir
        self.total_steps = total_steps
        self.enabled = enabled
        self.start = time.monotonic()
        self.start_step = 0
        self.records: list[dict[str, Any]] = []
        if enabled and self.path.exists():
            self.records = read_records(self.path)

    def rewind(self, step: int) -> None:
        """Keep only the records up to `step` (a resumed run continues after it)."""
        self.start_step = step
        self.start = time.monotonic()
        if not self.enabled:
            return
        self.records = [r for r in self.records if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.path)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_s: float,
        aux_loss: float | None = None,
    ) -> None:
        """`aux_loss`: an MoE router's load-balancing loss (before its coefficient), if the model has one."""
        elapsed = self.elapsed()
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        aux = {} if aux_loss is None else {"aux_loss": aux_loss}
        self.log({**record, **aux, "elapsed": elapsed})
        if self.enabled:
            done = step - self.start_step
            eta = elapsed / done * (self.total_steps - step) if done else float("inf")
            # name=value pairs: the form Katib's StdOut metrics collector reads (one metric per pair).
            log.info(
                "step %d/%d | loss=%.4f%s lr=%.3g grad_norm=%.3f tokens_per_s=%.0f | elapsed %s | eta %s",
                step,
                self.total_steps,
                loss,
                f" aux_loss={aux_loss:.4f}" if aux else "",
                lr,
                grad_norm,
                tokens_per_s,
                hms(elapsed),
                hms(eta),
            )

    def val_step(self, step: int, val_loss: float) -> None:
        self.log({"step": step, "val_loss": val_loss, "elapsed": self.elapsed()})
        if self.enabled:
            log.info("step %d/%d | val_loss=%.4f", step, self.total_steps, val_loss)

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
            **extra,
        }
        if self.enabled:
            tmp = self.output_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, self.output_dir / "summary.json")
            plot_loss(train, val, self.output_dir / "loss.png")
        return summary


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

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(".loss.png.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
