"""Measure the numeric gaps the trainer's equivalence tests allow for, over repeated runs.

    .venv/bin/python bench/measure_equivalence.py --seeds 5 --threads 1,2

For each seed and OMP thread count, the tiny LoRA job of tests/trainer/test_train.py runs as one process,
two processes and two single-process "nodes", and the script prints the largest gap seen between them:
losses step by step; adapter elements (absolute, and relative to their tensor's largest element); each
adapter tensor's difference norm relative to its norm; the re-computed validation loss against
summary.json's; merged logits against base + adapter. The seed changes the data order and the initial
adapter; the thread count changes the CPU kernels' reduction order, standing in for another machine.
The tests' tolerances are these maxima times a stated margin.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.trainer.conftest import BASE_ARGS, losses, run_trainer, val_loss
from tests.trainer.test_train import run_two_nodes
from tests.trainer.tiny import make_dataset, make_tiny_model


def gaps(model_dir: Path, runs: dict[str, Path]) -> dict[str, float]:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one = runs["one"]
    ref_losses = torch.tensor(losses(one))
    ref_weights = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    out = {"loss_abs": 0.0, "loss_rel": 0.0, "adapter_abs": 0.0, "adapter_scaled": 0.0, "adapter_norm": 0.0}
    for name in ("two", "nodes"):
        got = torch.tensor(losses(runs[name]))
        out["loss_abs"] = max(out["loss_abs"], float((got - ref_losses).abs().max()))
        out["loss_rel"] = max(out["loss_rel"], float(((got - ref_losses) / ref_losses).abs().max()))
        weights = load_file(str(runs[name] / "adapter" / "adapter_model.safetensors"))
        for key, tensor in weights.items():
            diff = float((tensor - ref_weights[key]).abs().max())
            out["adapter_abs"] = max(out["adapter_abs"], diff)
            scale = max(float(ref_weights[key].abs().max()), 1e-30)
            out["adapter_scaled"] = max(out["adapter_scaled"], diff / scale)
            norm = float((tensor - ref_weights[key]).norm() / max(float(ref_weights[key].norm()), 1e-30))
            out["adapter_norm"] = max(out["adapter_norm"], norm)
    two = runs["two"]
    summary = json.loads((two / "summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(two / "adapter")).eval()
    out["val_loss_rel"] = abs(val_loss(tuned, two) / summary["final_val_loss"] - 1)
    merged = AutoModelForCausalLM.from_pretrained(str(two / "model"), dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 17, 99, 200, 31, 7]])
    with torch.no_grad():
        out["merged_logits_abs"] = float((merged(ids).logits - tuned(ids).logits).abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS values")
    opts = parser.parse_args()
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model(root / "model")
        dataset = make_dataset(root / "data", "alpaca", "jsonl")
        for threads in opts.threads.split(","):
            for seed in range(opts.seeds):
                args = {**BASE_ARGS, "model_dir": model_dir, "dataset_dir": dataset, "merge_adapter": True}
                args["seed"] = seed
                runs = {name: root / f"t{threads}-s{seed}-{name}" for name in ("one", "two", "nodes")}
                env = {"OMP_NUM_THREADS": threads}
                for name, nproc in (("one", 0), ("two", 2)):
                    result = run_trainer({**args, "output_dir": runs[name]}, nproc=nproc, **env)
                    assert result.returncode == 0, result.stderr[-3000:]
                for result in run_two_nodes({**args, "output_dir": runs["nodes"]}, **env):
                    assert result.returncode == 0, result.stderr[-3000:]
                measured = gaps(model_dir, runs)
                print(
                    f"threads {threads} seed {seed}: " + " ".join(f"{k}={v:.3g}" for k, v in measured.items())
                )
                for key, value in measured.items():
                    worst[key] = max(worst.get(key, 0.0), value)
    print("max: " + " ".join(f"{k}={v:.3g}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
