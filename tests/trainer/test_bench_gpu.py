"""bench/bench_gpu.py is run on a lent GPU only, so it is checked here, on the CPU, at its tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_runs_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "bench/bench_gpu.py", "--size", "tiny", "--methods", "lora,qlora", "--steps", "5"]
    cmd += ["--seq", "64", "--batch", "2", "--micro", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    lora, qlora = report["rows"]
    assert lora["method"] == "lora" and lora["tokens_per_s"] > 0 and lora["tflops"] > 0
    assert lora["peak_memory_mb"] > 0 and lora["final_loss"] > 0
    assert qlora == {"method": "qlora", "error": ["needs CUDA and bitsandbytes"]}
    assert "| lora |" in proc.stdout


def test_bench_gpu_real_vocabulary_case_runs_with_and_without_chunking(tmp_path: Path) -> None:
    """The real-vocabulary comparison's flags (prompt/completion rows, loss chunk sizes), at tiny size."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "bench/bench_gpu.py", "--size", "tiny", "--methods", "lora", "--steps", "2"]
    cmd += ["--rows", "prompt_completion", "--loss-chunk-sizes", "0,1000000"]
    cmd += ["--seq", "256", "--batch", "2", "--micro", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chunked, whole = json.loads(out.read_text())["rows"]
    assert chunked["loss_chunk_size"] == 512 and whole["loss_chunk_size"] == 1000000
    # Same data, same seed: the chunking changes memory, not the numbers.
    assert abs(chunked["first_loss"] - whole["first_loss"]) < 1e-4 * whole["first_loss"]


def test_bench_gpu_memory_variants_run(tmp_path: Path) -> None:
    """--variants at tiny size on the CPU: cpu_offload trains (its GPU figures need a lent GPU); an 8-bit
    optimizer is reported as refused, in its one line. (The variants' training: test_optimizers.py.)"""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "bench/bench_gpu.py", "--size", "tiny", "--methods", "full", "--steps", "2"]
    cmd += ["--variants", "cpu_offload,adamw_8bit", "--seq", "64", "--batch", "2", "--micro", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    offload, eight_bit = json.loads(out.read_text())["rows"]
    assert offload["variant"] == "cpu_offload" and offload["final_loss"] > 0, proc.stderr[-3000:]
    assert eight_bit["error"] == ["error: optimizer adamw_8bit is bitsandbytes' 8-bit AdamW and runs on a "
                                  "CUDA GPU only; use optimizer: adamw here"]  # fmt: skip
    assert proc.returncode == 1  # a run that did not train is reported as a failure
