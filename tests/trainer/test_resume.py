"""Resume and failure handling of the real trainer under torchrun (gloo, FSDP2, tiny LoRA model).

One uninterrupted 2-process run is the reference; against it:
- a run whose rank 1 is SIGKILLed after step 3 (torchrun --max-restarts 1) finishes with the same losses
  step by step and the same adapter;
- a run SIGTERMed mid-way saves a checkpoint and exits 143; rerun at world size 1 it continues;
- rerunning the finished job trains nothing, another batch shape is refused with the reason, a larger
  max_steps extends the run; metrics.jsonl always holds one record per step.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pkg.trainer import checkpoint_dirs
from tests.trainer.conftest import (
    BASE_ARGS,
    LOSS_TOL,
    assert_same_adapter,
    cli,
    finish,
    losses,
    ok,
    run_trainer,
    start,
    torchrun,
    trainer_env,
    two_nodes,
)

# Constant learning rate: the losses of steps 1..k do not depend on max_steps, so runs of different
# lengths are comparable step by step.
ARGS = {**BASE_ARGS, "max_steps": 6, "save_every": 2, "keep_last": 2, "lr_scheduler": "constant"}
ARGS["val_fraction"] = 0.0
FAULTY = "tests.trainer.faulty_trainer"  # the trainer with TRAINER_TEST_* faults injected


def launch(cmd: list[str], timeout: int = 300, **env: str) -> tuple[subprocess.Popen, Callable]:
    """Start a launch; returns the process and a ``wait(timeout)`` that kills all of it on timeout."""
    proc = start(cmd, trainer_env(**env))
    return proc, lambda timeout=timeout: finish(proc, timeout)


def train_steps(output_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, alpaca_data) -> tuple[dict, Path]:
    """The uninterrupted run: 2 processes, 6 steps, checkpoints at 2, 4, 6 (keeping 4 and 6)."""
    args = {**ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data}
    out = tmp_path_factory.mktemp("reference")
    ok(run_trainer({**args, "output_dir": out}, nproc=2))
    return args, out


def test_reference_layout(reference):
    _, out = reference
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in checkpoint_dirs.list_checkpoints(out)] == [
        4,
        6,
    ]  # keep_last 2, the final step included
    meta = checkpoint_dirs.read_meta(checkpoint_dirs.latest_checkpoint(out))
    assert meta["world_size"] == 2
    assert set(meta["fingerprint"]) == {"model", "method", "dataset", "batch", "samples"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fingerprint"] == meta["fingerprint"] and summary["max_steps"] == 6


def test_killed_rank_restarts_and_matches_uninterrupted(reference, tmp_path):
    args, ref = reference
    cmd = [*torchrun(2), "--max-restarts", "1", "-m", FAULTY, *cli({**args, "output_dir": tmp_path})]
    log = ok(launch(cmd, TRAINER_TEST_KILL_AT_STEP="3")[1]())
    assert "resuming from step 2" in log, log[-3000:]
    assert train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]  # step 3 was logged twice: once kept
    torch.testing.assert_close(losses(tmp_path), losses(ref), **LOSS_TOL)
    assert_same_adapter(adapter(tmp_path), adapter(ref))


def test_sigterm_saves_exits_143_and_resumes_at_another_world_size(reference, tmp_path):
    args, ref = reference
    args = {**args, "output_dir": tmp_path, "save_every": 100}  # only the SIGTERM checkpoint (and the final)
    proc, wait = launch([*torchrun(2), "-m", FAULTY, *cli(args)], TRAINER_TEST_STEP_SLEEP="1")
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):  # may hold a torn line
        assert proc.poll() is None and time.monotonic() < deadline, wait(1).stderr[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to torchrun, as Kubernetes does on eviction; it forwards to workers
    result = wait(120)
    assert result.returncode != 0, result.stdout[-3000:]
    # One line from the trainer (torchrun itself still reports the signal it got, with its own traceback).
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: stopped by SIGTERM after step") and "checkpoint saved" in line, line
    [(stopped, _)] = checkpoint_dirs.list_checkpoints(tmp_path)
    assert 2 <= stopped < 6 and not (tmp_path / "summary.json").exists()

    log = ok(run_trainer(args))  # one process now: the sharded checkpoint is resharded
    assert f"resuming from step {stopped}" in log
    assert train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(losses(tmp_path), losses(ref), **LOSS_TOL)  # 1 process now


def test_finished_rerun_mismatch_and_extension(reference, tmp_path):
    args, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    args = {**args, "output_dir": out}
    before = (out / "metrics.jsonl").read_bytes(), (out / "adapter" / "adapter_model.safetensors").stat()

    log = ok(run_trainer(args))  # same job again: nothing to do
    assert "already finished" in log, log[-3000:]
    assert (out / "metrics.jsonl").read_bytes() == before[0]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == before[1].st_mtime_ns

    log = ok(run_trainer({**args, "merge_adapter": True}))  # another output: written, nothing trained
    assert "resuming from step 6" in log and (out / "model" / "config.json").exists()
    assert (out / "metrics.jsonl").read_bytes() == before[0]

    refused = run_trainer({**args, "global_batch_size": 4, "method": "full"})  # another batch shape, method
    assert refused.returncode != 0
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "refusing checkpoint" in line and "global_batch_size=8" in line and "global_batch_size=4" in line
    assert "method: checkpoint has 'lora (lora_rank=8" in line and "this run has 'full'" in line
    assert "Traceback" not in refused.stderr

    log = ok(run_trainer({**args, "max_steps": 8}))  # extend: continue from the final checkpoint
    assert "resuming from step 6" in log and "learning-rate schedule" not in log  # constant: no jump
    records = (out / "metrics.jsonl").read_bytes()
    assert records.startswith(before[0]) and train_steps(out) == list(range(1, 9))
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_node_local_output_dirs_train_without_checkpoints_and_keep_the_config(
    tmp_path, tiny_model, alpaca_data
):
    """Each node with its own output_dir (no shared volume): checkpoints are off, said once, while the
    config stays as given (config.yaml keeps save_every)."""
    args = {**ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "max_steps": 2, "save_every": 1}
    runs = two_nodes(lambda node: ["-m", "pkg.trainer", *cli({**args, "output_dir": tmp_path / f"n{node}"})])
    log = "".join(ok(r) for r in runs)
    assert log.count("is not one volume shared by every node: checkpoints are off, save_every 1") == 1, log
    assert "save_every: 1" in (tmp_path / "n0" / "config.yaml").read_text()
    assert not (tmp_path / "n0" / "checkpoints").exists() and train_steps(tmp_path / "n0") == [1, 2]
