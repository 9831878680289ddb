"""`optimizer_in_backward: auto` (1 process; 2 processes under FSDP: test_optimizers.py): where auto steps in
the backward, the run is the one that steps after it, bit for bit; a checkpoint of either resumes in the
other; a gradient that is not finite stops the run with nothing written from the weights it reached."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from pkg.trainer import plan
from pkg.trainer.config import load_config, resolve_in_backward
from pkg.trainer.sft import SFT
from tests.trainer.test_errors import one_line_error

# One micro-batch per step, no clipping, nan_policy stop (the default): auto steps in the backward. The lr
# changes at every step (warmup), the same in a 2-step and a 4-step run: a resumed run must follow it.
ARGS = {
    "method": "full",
    "learning_rate": 2e-3,
    "lr_scheduler": "constant",
    "warmup_steps": 4,
    "max_steps": 4,
}
ARGS.update(micro_batch_size=8, global_batch_size=8, max_grad_norm=0.0, val_fraction=0.0)
IN_BACKWARD = "stepped in the backward, one weight at a time (optimizer_in_backward: auto: method full"
# A clipping threshold no gradient here reaches: its factor is exactly 1 (torch clamps it), so the updates
# are unchanged, but max_grad_norm > 0 turns auto to stepping after the backward.
NEVER_CLIPS = 1e9


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_run(got, want) -> None:
    """Bitwise the same weights and losses; the gradient norms within float32 summation order."""
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in records(got)] == [r["loss"] for r in records(want)]
    torch.testing.assert_close(
        [r["grad_norm"] for r in records(got)], [r["grad_norm"] for r in records(want)], rtol=1e-6, atol=0
    )


@pytest.mark.fast
def test_auto_decides_in_one_place_and_says_why():
    base = ["--method", "full", "--max_grad_norm", "0", "--global_batch_size", "8", "--micro_batch_size", "4"]
    cfg = load_config(base)
    assert resolve_in_backward(cfg, 2)[0] and not resolve_in_backward(cfg, 1)[0]  # accumulation 2 at 1
    for extra, why in (
        (["--max_grad_norm", "1"], "max_grad_norm 1"),
        (["--nan_policy", "skip_step"], "nan_policy skip_step"),
        (["--method", "lora"], "method lora"),
        (["--cpu_offload", "true"], "cpu_offload"),
    ):
        assert resolve_in_backward(load_config(base + extra), 2) == (
            False, f"optimizer_in_backward: auto, not with {why}"
        )  # fmt: skip
    # the planner predicts what the run will do
    assert plan.job_from_config(cfg, False, world_size=2).optimizer_in_backward
    assert not plan.job_from_config(cfg, False, world_size=1).optimizer_in_backward
    # true and false are the user's; a bare flag and YAML's booleans mean true / false
    assert resolve_in_backward(load_config([*base, "--optimizer_in_backward", "false"]), 2)[0] is False
    assert load_config([*base, "--optimizer_in_backward"]).optimizer_in_backward == "true"
    with pytest.raises(Exception, match="optimizer_in_backward: expected auto, true or false, got 'maybe'"):
        load_config(["--optimizer_in_backward", "maybe"])


def test_auto_steps_in_the_backward_exactly_like_after_it_and_resumes_across(
    in_process, tmp_path, tiny_model, alpaca_data, capsys
):
    run = {**ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data}
    assert in_process({**run, "output_dir": tmp_path / "auto"}) == 0
    assert IN_BACKWARD in capsys.readouterr().out  # the log
    assert in_process({**run, "output_dir": tmp_path / "false", "optimizer_in_backward": "false"}) == 0
    assert "stepped after the backward (optimizer_in_backward: false)" in capsys.readouterr().out
    assert_same_run(tmp_path / "auto", tmp_path / "false")

    # A checkpoint of step 2 resumed in the other mode (max_grad_norm set or dropped on resume turns auto
    # off or on), either way round: the same run as the uninterrupted one.
    for first, then, name in ((0.0, NEVER_CLIPS, "after"), (NEVER_CLIPS, 0.0, "in")):
        out = tmp_path / f"resumed-{name}"
        two_steps = {**run, "output_dir": out, "max_steps": 2, "save_every": 2, "max_grad_norm": first}
        assert in_process(two_steps) == 0
        capsys.readouterr()
        assert in_process({**run, "output_dir": out, "max_grad_norm": then}) == 0
        logged = capsys.readouterr().out
        assert "resuming from step 2" in logged and f"stepped {name} the backward" in logged
        assert_same_run(out, tmp_path / "auto")


def test_a_non_finite_gradient_stepped_in_the_backward_stops_with_nothing_written(
    in_process, tmp_path, tiny_model, alpaca_data, capsys, monkeypatch
):
    loss_sum, calls = SFT.loss_sum, []

    def poisoned(self, model, batch):
        """Step 2's loss stays finite; its gradient is NaN (d sqrt(x)/dx at 0, times 0)."""
        calls.append(1)
        loss, aux = loss_sum(self, model, batch)
        if len(calls) == 2:
            w = next(model.parameters())
            loss = loss + 0.0 * torch.sqrt(w.sum() - w.sum().detach())
        return loss, aux

    monkeypatch.setattr(SFT, "loss_sum", poisoned)
    out = tmp_path / "nan"
    run = {**ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "output_dir": out, "save_every": 1}
    handler = signal.getsignal(signal.SIGTERM)
    assert in_process(run) == 1
    assert signal.getsignal(signal.SIGTERM) is handler  # a run stopped by an error gives its handlers back
    captured = capsys.readouterr()
    assert IN_BACKWARD in captured.out
    line = one_line_error(captured.err)
    assert "grad_norm=nan: not finite; stopped; its update (stepped in the backward) reached no checkpoint " \
        "and wrote no final outputs (nan_policy: stop)" in line and "loss=nan" not in line  # fmt: skip
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # from finite weights
