"""Fixtures for the exporter: the S3 servers and the Hub server the initializers' tests use too
(tests/support/fixtures.py), a finished run's output folder, and a runner for `python -m pkg.model_exporter`.

moto is told to accept parts under S3's 5 MiB minimum (S3_UPLOAD_PART_MIN_SIZE, read by the moto server
process), so multipart uploads run on files of a few MiB with the 256 KiB parts of the tests' INIT_PART_SIZE.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

os.environ["S3_UPLOAD_PART_MIN_SIZE"] = str(64 * 1024)

from tests.support.fixtures import (  # after the setting the moto process inherits
    EntryPoint,
    hub,
    one_error_line,
    s3,
    s3_proxy,
    s3_servers,
)

__all__ = ["hub", "one_error_line", "s3", "s3_proxy", "s3_servers"]


def write_run(root: Path, adapter_bytes: int = 1_300_000, model: bool = False) -> Path:
    """A finished LoRA run's output folder as the trainer leaves it (random weights of the given size), with
    the model initializer's completion marker next to it, naming where the base model came from."""
    out = root / "workspace" / "output"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(adapter_bytes))
    (out / "adapter" / "adapter_config.json").write_text('{"r": 8, "base_model_name_or_path": "/x"}')
    if model:
        (out / "model").mkdir()
        (out / "model" / "model.safetensors").write_bytes(os.urandom(2 * adapter_bytes))
        (out / "model" / "config.json").write_text("{}")
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "state.bin").write_bytes(b"x" * 100)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    summary = {"steps": 3, "first_loss": 2.5, "final_loss": 1.25, "method": "lora", "objective": "sft"}
    (out / "summary.json").write_text(json.dumps({**summary, "fingerprint": "abc123def456"}))
    marker = root / "workspace" / "model" / ".initializer"
    marker.mkdir(parents=True)
    (marker / "manifest.json").write_text(json.dumps({"request": {"storage_uri": "hf://acme/base-1b"}}))
    return out


class Exporter(EntryPoint):
    """Runs `python -m pkg.model_exporter` with the environment the images get."""

    def __call__(self, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("pkg.model_exporter", timeout, **extra)

    def popen(self, **extra: str) -> subprocess.Popen[str]:
        return self.start("pkg.model_exporter", **extra)


@pytest.fixture
def export(tmp_path: Path) -> Exporter:
    return Exporter(tmp_path)
