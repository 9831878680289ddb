"""`optimizer`, `optimizer_in_backward` and `cpu_offload` under real torchrun (2 processes, gloo, full
fine-tuning): each trains, and a run stopped at step 2 and resumed equals the uninterrupted one. All runs
share one launch (arch_worker.py: a launch costs 10-20 s here, a tiny run a few)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pkg.trainer.config import load_config
from pkg.trainer.errors import ConfigError
from tests.trainer.conftest import (
    BASE_ARGS,
    LOSS_TOL,
    ROOT,
    assert_same_adapter,
    finish,
    losses,
    start,
    torchrun,
    trainer_env,
)
from tests.trainer.plan_check import assert_plan_matches

WORKER = ROOT / "tests" / "trainer" / "arch_worker.py"
# Constant lr: a run of 2 steps extended to 4 follows the 4-step run's schedule. One micro-batch per rank
# and step (optimizer_in_backward needs it). No clipping unless a case sets it (in-backward refuses it).
ARGS = {**BASE_ARGS, "method": "full", "learning_rate": 2e-3, "lr_scheduler": "constant", "max_steps": 4}
ARGS.update(micro_batch_size=4, save_every=2, max_grad_norm=0.0, val_fraction=0.0)
CASES = {
    "adamw": {"optimizer_in_backward": False},
    "in_backward": {},  # auto: in the backward here (accumulation 1, no clipping); as adamw bit for bit
    "sgd": {"optimizer": "sgd", "learning_rate": 0.3},  # 0.5 jumped above the first loss at a step or two
    "adamw_clipped": {"max_grad_norm": 1.0},
    "cpu_offload": {"cpu_offload": True, "max_grad_norm": 1.0},  # FSDP2's offload policy, clipping too
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, alpaca_data) -> dict:
    """Each case uninterrupted, and stopped at step 2 then resumed to 4; adamw_8bit (refused on CPU)."""
    tmp = tmp_path_factory.mktemp("optimizers")
    base = {**ARGS, "model_dir": str(tiny_model), "dataset_dir": str(alpaca_data)}
    plan = []
    for name, extra in CASES.items():
        plan.append({"name": name, "args": {**base, **extra, "output_dir": str(tmp / name)}})
        if name not in ("adamw", "adamw_clipped"):  # references only (adamw's resume: test_resume.py)
            resumed = {**base, **extra, "output_dir": str(tmp / f"{name}-resumed")}
            plan.append({"name": f"{name}-2", "args": {**resumed, "max_steps": 2}})
            plan.append({"name": f"{name}-resumed", "args": resumed})
    plan.append(
        {"name": "adamw_8bit", "args": {**base, "optimizer": "adamw_8bit", "output_dir": str(tmp / "8")}}
    )
    (tmp / "runs.json").write_text(json.dumps(plan))
    result = finish(start([*torchrun(2), str(WORKER), str(tmp / "results.json"), str(tmp / "runs.json")],
                          trainer_env()), timeout=600)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {"dir": tmp, "log": result.stdout, **json.loads((tmp / "results.json").read_text())}


def logged(runs: dict, name: str) -> str:
    """The log of the run `name` (each starts with its config line)."""
    [text] = [t for t in runs["log"].split(" INFO config: ") if f"output_dir={runs['dir'] / name} " in t]
    return text


def model_weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("name", ["in_backward", "sgd", "cpu_offload"])
def test_each_optimizer_trains_and_resumes_exactly(runs, name):
    tmp = runs["dir"]
    for run in (name, f"{name}-2", f"{name}-resumed"):
        assert runs[run]["code"] == 0, runs[run]
    trained = losses(tmp / name)
    assert trained[-1] < trained[0] - 0.2, trained
    torch.testing.assert_close(losses(tmp / f"{name}-resumed"), trained, **LOSS_TOL)
    assert_same_adapter(model_weights(tmp / f"{name}-resumed"), model_weights(tmp / name))
    assert_plan_matches(tmp / name, nodes=1, per_node=2)  # the planner, against rank 0's peak RSS


def grad_norms(out) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_auto_steps_in_the_backward_under_fsdp_bit_for_bit_as_after_it(runs):
    tmp = runs["dir"]
    assert "stepped in the backward, one weight at a time (optimizer_in_backward: auto" in logged(
        runs, "in_backward"
    )
    assert "stepped after the backward (optimizer_in_backward: false)" in logged(runs, "adamw")
    assert losses(tmp / "in_backward") == losses(tmp / "adamw")
    got, want = model_weights(tmp / "in_backward"), model_weights(tmp / "adamw")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # in the backward the norm is summed from the gradients as they are consumed: float32 summation order
    torch.testing.assert_close(grad_norms(tmp / "in_backward"), grad_norms(tmp / "adamw"), rtol=1e-6, atol=0)


def test_offload_trains_like_plain_adamw(runs):
    tmp = runs["dir"]
    torch.testing.assert_close(losses(tmp / "cpu_offload"), losses(tmp / "adamw_clipped"), **LOSS_TOL)
    assert_same_adapter(model_weights(tmp / "cpu_offload"), model_weights(tmp / "adamw_clipped"))
    torch.testing.assert_close(
        grad_norms(tmp / "cpu_offload"), grad_norms(tmp / "adamw_clipped"), rtol=1e-4, atol=1e-6
    )


def test_an_8bit_optimizer_is_refused_on_cpu_in_one_line(runs):
    assert runs["adamw_8bit"]["code"] != 0
    assert runs["adamw_8bit"]["error"] == (
        "error: optimizer adamw_8bit is bitsandbytes' 8-bit AdamW and runs on a CUDA GPU only; "
        "use optimizer: adamw here"
    )


@pytest.mark.fast
def test_optimizer_in_backward_settings_are_checked_up_front():
    with pytest.raises(ConfigError, match="optimizer_in_backward applies to method full"):
        load_config(["--optimizer_in_backward", "--max_grad_norm", "0"])
    with pytest.raises(ConfigError, match="set max_grad_norm: 0"):
        load_config(["--optimizer_in_backward", "--method", "full"])
    with pytest.raises(ConfigError, match="optimizer: 'adam' is not one of adamw, adamw_8bit"):
        load_config(["--optimizer", "adam"])
    assert load_config(["--optimizer_in_backward", "--method", "full", "--max_grad_norm", "0"])
