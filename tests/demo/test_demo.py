"""`make demo` end to end, shortened: embedded model and data, local S3, both initializers, 2-process LoRA,
the export of the adapter back to the local S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--workdir", str(work), "--steps", "30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for heading in ("1/5 Preparing", "2/5 dataset-initializer", "2/5 model-initializer", "3/5 llm-trainer"):
        assert heading in out
    # The adapter landed in the demo's S3 server, manifest last, and is listed.
    assert "5/5 model-exporter" in out
    export = "s3://demo/exports/tiny-llama-animal-sounds-lora/"
    for name in ("adapter_model.safetensors", "adapter_config.json", ".model-exporter/manifest.json"):
        assert export + name in out, name
    assert "before training:" in out and "after training:" in out
    workspace = work / "workspace"
    # The initializers left complete copies with their completion markers.
    assert (workspace / "dataset" / "train.jsonl").stat().st_size > 0
    assert (workspace / "model" / "model.safetensors").stat().st_size > 0
    output = workspace / "output"
    expected = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.png")
    for name in expected:
        assert (output / name).is_file(), name
    losses = [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert json.loads((output / "summary.json").read_text())["steps"] == 30
