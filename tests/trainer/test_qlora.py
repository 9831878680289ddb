"""QLoRA on the CPU: bitsandbytes 0.50.2 (pinned) has 4-bit NF4 kernels for the CPU, so the 4-bit path that
the CUDA image runs (quantized base loaded on every rank, LoRA on it, the adapter's gradients all-reduced
by hand since the base is not sharded) runs here too, with gloo, at world size 2."""

from __future__ import annotations

import json

from tests.trainer.conftest import BASE_ARGS, losses, run_trainer


def test_two_process_qlora_on_cpu(tmp_path, tiny_model, alpaca_data):
    args = {**BASE_ARGS, "method": "qlora", "max_steps": 3, "val_fraction": 0.0, "precision": "fp32"}
    args |= {"model_dir": tiny_model, "dataset_dir": alpaca_data, "output_dir": tmp_path}
    result = run_trainer(args, nproc=2, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "kernels-community" not in result.stdout + result.stderr  # bitsandbytes' optional-kernel notice
    steps = losses(tmp_path)
    assert len(steps) == 3 and all(0 < loss < 20 for loss in steps), steps
    assert steps[-1] < steps[0]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == BASE_ARGS["lora_rank"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == "qlora"
