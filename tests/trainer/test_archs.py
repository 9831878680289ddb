"""The architecture matrix: tiny random models of the Hugging Face architectures in tiny.ARCHS (dense and
mixture-of-experts), each trained at 2 processes (gloo, FSDP2) with LoRA at the default `all-linear` and
dropout, merged, and with full fine-tuning.

All 2 x len(ARCHS) runs share ONE torchrun launch (tests/trainer/arch_worker.py): a launch costs 10-20 s
here, a tiny run a few. The checks on each run's outputs are then one test per architecture and method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import (
    BASE_ARGS,
    LOSS_TOL,
    ROOT,
    VAL_LOSS_REL,
    assert_same_adapter,
    check_exported_adapter,
    cli,
    finish,
    losses,
    start,
    torchrun,
    trainer_env,
    val_loss,
)
from tests.trainer.tiny import ARCHS, MOE_ARCHS, make_arch_model

WORKER = ROOT / "tests" / "trainer" / "arch_worker.py"
# 4 steps of 8 samples; the trainer's default lora_dropout (0.05), which peft refuses on expert parameters.
ARGS = {k: v for k, v in BASE_ARGS.items() if k != "lora_dropout"}
ARGS.update(max_steps=4, dist_timeout_minutes=2)
MODES = {"lora": {"merge_adapter": True}, "full": {"method": "full", "learning_rate": 2e-3}}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, alpaca_data) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("archs")
    runs = []
    for arch in ARCHS:
        model = make_arch_model(root / "models" / arch, arch)
        for mode, extra in MODES.items():
            args = {
                **ARGS,
                "model_dir": model,
                "dataset_dir": alpaca_data,
                "output_dir": root / f"{arch}-{mode}",
            }
            runs.append({"name": f"{arch}-{mode}", "args": {k: str(v) for k, v in {**args, **extra}.items()}})
    runs += moe_runs(root, alpaca_data)
    (root / "runs.json").write_text(json.dumps(runs))
    cmd = [*torchrun(2), str(WORKER), str(root / "results.json"), str(root / "runs.json")]
    launch = finish(start(cmd, trainer_env()), timeout=900)
    (root / "launch.log").write_text(launch.stdout + launch.stderr)
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-4000:]
    return root, json.loads((root / "results.json").read_text())


def moe_runs(root: Path, dataset: Path) -> list[dict]:
    """Qwen3-MoE beyond the defaults: expert parameters named explicitly, with a checkpoint that a longer
    run resumes from; and LoRA without dropout, to compare with one process."""
    model = root / "models" / "qwen3_moe"
    experts = {
        **ARGS, "model_dir": model, "dataset_dir": dataset, "output_dir": root / "qwen3_moe-experts",
        "lora_target_modules": "q_proj,v_proj,experts.gate_up_proj,experts.down_proj", "save_every": 2,
    }  # fmt: skip
    nodrop = {**ARGS, "model_dir": model, "dataset_dir": dataset, "output_dir": root / "qwen3_moe-nodrop"}
    runs = {
        "qwen3_moe-experts": experts,
        "qwen3_moe-experts-longer": {**experts, "max_steps": 6},
        # One sample per micro-batch: the router loss is a mean per micro-batch (as in transformers), so only
        # then do 1 and 2 processes group the same tokens into each of its terms.
        "qwen3_moe-nodrop": {**nodrop, "lora_dropout": 0.0, "micro_batch_size": 1},
    }
    return [{"name": name, "args": {k: str(v) for k, v in args.items()}} for name, args in runs.items()]


@pytest.fixture
def one_process(monkeypatch):
    """Run the trainer's entry point in this process (a group of one), outside any torchrun environment."""
    from pkg.trainer.__main__ import main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return lambda args: main(cli(args))


def check_run(matrix, name: str) -> tuple[Path, dict]:
    """The run's output folder and summary, once it is known to have finished and learned."""
    root, results = matrix
    assert results[name]["code"] == 0, results[name]
    out = root / name
    trained = losses(out)
    assert len(trained) == 4 and all(math.isfinite(x) for x in trained), trained
    assert trained[-1] < trained[0], trained  # it learns, even in 4 steps
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_all_linear_trains_and_merges(matrix, arch):
    from safetensors.torch import load_file

    out, summary = check_run(matrix, f"{arch}-lora")
    model_dir = matrix[0] / "models" / arch
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if arch in MOE_ARCHS:  # the experts are adapted too, and the router's load-balancing loss is reported
        assert any(".experts." in k for k in weights), sorted(weights)[:8]
        assert all(r["aux_loss"] > 0 for r in records if "loss" in r), records[0]
    else:
        assert not any("aux_loss" in r for r in records)

    check_exported_adapter(model_dir, out, summary["final_val_loss"])


@pytest.mark.parametrize("arch", ARCHS)
def test_full_finetuning_trains_and_exports(matrix, arch):
    from transformers import AutoModelForCausalLM

    out, summary = check_run(matrix, f"{arch}-full")
    assert summary["trainable_params"] == summary["total_params"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    assert model.config.model_type == arch
    assert val_loss(model, out) == pytest.approx(summary["final_val_loss"], rel=VAL_LOSS_REL)


def test_moe_expert_parameters_named_checkpointed_and_resumed(matrix):
    from safetensors.torch import load_file

    root, results = matrix
    assert results["qwen3_moe-experts"]["code"] == results["qwen3_moe-experts-longer"]["code"] == 0, results
    out = root / "qwen3_moe-experts"
    log = (root / "launch.log").read_text()
    assert f"resuming from step 4 of 6 ({out}/checkpoints/step-4)" in log
    assert any("step 6/6 | loss=" in line and " aux_loss=" in line for line in log.splitlines())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Only what was named is adapted: q_proj, v_proj and both expert stacks (not k/o_proj, not the router).
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    adapted = {key.split(".lora_")[0].split(".", 5)[-1] for key in weights}
    assert adapted == {"self_attn.q_proj", "self_attn.v_proj", "mlp.experts", "mlp.experts.base_layer"}, (
        adapted
    )
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    summary = json.loads((out / "summary.json").read_text())
    check_exported_adapter(root / "models" / "qwen3_moe", out, summary["final_val_loss"])


def test_moe_one_and_two_processes_agree(matrix, one_process, tmp_path):
    """Sharded experts and the router loss averaged over ranks give one process's losses and adapter."""
    from safetensors.torch import load_file

    root, results = matrix
    assert results["qwen3_moe-nodrop"]["code"] == 0, results
    [run] = [r for r in json.loads((root / "runs.json").read_text()) if r["name"] == "qwen3_moe-nodrop"]
    assert one_process({**run["args"], "output_dir": str(tmp_path)}) == 0
    two, one = root / "qwen3_moe-nodrop", tmp_path

    def aux(out: Path) -> list[float]:
        return [json.loads(line)["aux_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "aux_loss" in line]  # fmt: skip

    torch.testing.assert_close(losses(two), losses(one), **LOSS_TOL)
    torch.testing.assert_close(aux(two), aux(one), **LOSS_TOL)
    adapter = "adapter/adapter_model.safetensors"
    assert_same_adapter(load_file(str(two / adapter)), load_file(str(one / adapter)))


def test_router_loss_enters_the_gradient_with_the_models_coefficient(one_process, tmp_path, alpaca_data):
    """One full-fine-tuning step of Qwen3-MoE here: `router_aux_loss_coef` of config.json (the model's own)
    scales the load-balancing loss in the gradient; 0 turns it off, and it is then not reported."""
    step = {}
    for coef in (0.0, 1.0):
        model = make_arch_model(tmp_path / f"model-{coef}", "qwen3_moe", router_aux_loss_coef=coef)
        out = tmp_path / f"out-{coef}"
        args = {**ARGS, "model_dir": model, "dataset_dir": alpaca_data, "output_dir": out, "method": "full"}
        assert one_process({**args, "max_steps": 1, "val_fraction": 0.0}) == 0
        [step[coef]] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "aux_loss" not in step[0.0] and step[1.0]["aux_loss"] > 1.0  # ~top_k for a balanced router
    assert step[0.0]["loss"] == pytest.approx(step[1.0]["loss"], rel=1e-6)  # same weights, same tokens
    assert abs(step[1.0]["grad_norm"] / step[0.0]["grad_norm"] - 1) > 1e-3  # the router loss's gradient


def tiny_in_memory(model_type: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=320, **{**ARCHS.get(model_type, {}), **overrides})
    return AutoModelForCausalLM.from_config(config)


def test_lora_targets_of_dense_and_moe_models():
    from pkg.trainer.model import lora_targets

    attention = ["k_proj", "o_proj", "q_proj", "v_proj"]
    mlp = ["down_proj", "gate_proj", "up_proj"]
    assert lora_targets(tiny_in_memory("qwen2"), ["all-linear"]) == (sorted(attention + mlp), [])
    moe = tiny_in_memory("qwen3_moe")
    experts = ["experts.down_proj", "experts.gate_up_proj"]
    assert lora_targets(moe, ["all-linear"]) == (attention, [*experts, "gate.weight"])
    assert lora_targets(moe, ["q_proj", "experts.down_proj"]) == (["q_proj"], ["experts.down_proj"])
    gpt2 = tiny_in_memory("gpt2")  # Conv1D layers; the tied output head is left out
    assert lora_targets(gpt2, ["all-linear"]) == (["c_attn", "c_fc", "c_proj"], [])


def test_linear_layers_peft_reads_as_experts_are_named(caplog):
    """DeepSeek-V3's dense and shared-expert MLPs are linear layers named like the transformers-4 experts,
    which peft maps onto the fused experts: the trainer says those layers get no adapter."""
    import logging

    from pkg.trainer.config import TrainConfig
    from pkg.trainer.model import add_lora

    model = tiny_in_memory(
        "deepseek_v3", hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pkg.trainer.model"):
        add_lora(model, TrainConfig(lora_rank=4))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(
        "peft reads down_proj, gate_proj, up_proj as this architecture's expert weights"
    )
    assert any("lora_dropout applies to the linear layers only" in r.getMessage() for r in caplog.records)


def test_dora_on_moe_leaves_experts_frozen_or_says_why():
    from peft.tuners.lora.layer import ParamWrapper

    from pkg.trainer.config import TrainConfig
    from pkg.trainer.errors import TrainerError
    from pkg.trainer.model import add_lora

    model = add_lora(tiny_in_memory("qwen3_moe"), TrainConfig(use_dora=True))
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    named = TrainConfig(use_dora=True, lora_target_modules=["q_proj", "experts.down_proj"])
    with pytest.raises(TrainerError, match=r"experts.down_proj are parameters .* cannot adapt with DoRA"):
        add_lora(tiny_in_memory("qwen3_moe"), named)
