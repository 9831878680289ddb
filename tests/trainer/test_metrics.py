"""metrics.jsonl, summary.json and loss.png from the Metrics writer."""

from __future__ import annotations

import json
import os

import pytest

from pkg.trainer.metrics import Metrics, hms

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


def test_records_rewind_summary_and_plot(tmp_path):
    metrics = Metrics(tmp_path, total_steps=4, enabled=True)
    for step in range(1, 5):
        metrics.train_step(step, loss=2.0 / step, lr=1e-3, grad_norm=0.5, tokens_per_s=100.0)
    metrics.val_step(4, 0.7)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a torn last line from a crash

    again = Metrics(tmp_path, total_steps=6, enabled=True)  # a resumed run
    again.rewind(2)
    assert [r["step"] for r in again.records] == [1, 2]
    again.train_step(3, loss=0.5, lr=1e-3, grad_norm=0.4, tokens_per_s=120.0)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]

    summary = again.finish({"method": "lora"})
    assert summary["first_loss"] == 2.0 and summary["final_loss"] == 0.5 and summary["steps"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "lora"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rewind_keeps_one_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 8)]
    lines.insert(3, json.dumps({"step": 3, "val_loss": 0.5}))  # a validation record at step 3
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')  # torn last line from a crash
    Metrics(tmp_path, total_steps=8, enabled=True).rewind(4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]
    assert records[3] == {"step": 3, "val_loss": 0.5}
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left


def test_other_ranks_write_nothing(tmp_path):
    metrics = Metrics(tmp_path, total_steps=2, enabled=False)
    metrics.train_step(1, 1.0, 1e-3, 0.1, 10.0)
    metrics.finish({})
    assert list(tmp_path.iterdir()) == []


def test_hms():
    assert hms(3725.2) == "1:02:05" and hms(float("inf")) == "?"


def test_a_mean_over_no_target_is_null_in_the_records_and_the_plot(tmp_path):
    from pkg.trainer.objective import means

    assert means(("loss",), [3.0], 2) == {"loss": 1.5}
    no_target = means(("loss",), [0.0], 0, "val_")["val_loss"]  # a held-out set or a step without targets
    metrics = Metrics(tmp_path, total_steps=2, enabled=True)
    metrics.train_step(1, loss=no_target, lr=1e-3, grad_norm=float("nan"), tokens_per_s=10.0)
    metrics.train_step(2, loss=1.0, lr=1e-3, grad_norm=0.5, tokens_per_s=10.0)
    metrics.val_step(2, no_target)
    summary = metrics.finish({})
    assert [r.get("loss", r.get("val_loss")) for r in metrics.records] == [None, 1.0, None]
    assert summary["first_loss"] is None and summary["final_val_loss"] is None
    assert (tmp_path / "loss.png").exists()
