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
