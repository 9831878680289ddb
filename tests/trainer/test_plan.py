"""The planner (`python -m pkg.trainer.plan`): its arithmetic, its command line, docs/scaling.md's table, and
its `--device cpu` prediction against a measured bf16 LoRA run at 2 processes. (fp32 full and LoRA runs at
1, 2 and 4 ranks are checked where they already run: test_hybrid.py, test_optimizers.py, test_train.py;
bench/bench_plan.py does the same on a 79M-parameter real-vocabulary model.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pkg.trainer import batching, data_cache, plan
from tests.trainer.conftest import BASE_ARGS, ROOT, run_trainer
from tests.trainer.plan_check import assert_plan_matches

GiB = 2**30


@pytest.mark.fast
def test_the_state_of_full_finetuning_is_16_bytes_a_weight_over_the_shard_group():
    shape = plan.MODELS["8B"]
    job = plan.Job(method="full", bf16=True, micro_batch_size=1, max_seq_length=2048)
    alone = plan.estimate(shape, job, plan.Cluster(1, 1))["per_rank"]
    eight = plan.estimate(shape, job, plan.Cluster(1, 8))["per_rank"]
    params = shape.params()
    assert (alone["weights"], alone["gradients"], alone["optimizer_state"]) == (
        4 * params,
        4 * params,
        8 * params,
    )
    assert eight["weights"] == 4 * params // 8 and eight["optimizer_state"] == 8 * params // 8
    in_backward = plan.estimate(
        shape, plan.Job(method="full", optimizer_in_backward=True), plan.Cluster(1, 8)
    )
    assert in_backward["per_rank"]["gradients"] == 4 * shape.layer_params() // 8  # one layer's
    sgd = plan.estimate(shape, plan.Job(method="full", optimizer="sgd"), plan.Cluster(1, 8))
    assert sgd["per_rank"]["optimizer_state"] == 0
    offload = plan.estimate(shape, plan.Job(method="full", cpu_offload=True), plan.Cluster(1, 8))["per_rank"]
    assert offload["weights"] == 0 and offload["host_offload"] == 16 * params // 8


@pytest.mark.fast
def test_hybrid_on_several_nodes_when_a_node_holds_the_model_and_what_it_moves():
    shape, job = plan.MODELS["8B"], plan.Job(method="full", activation_checkpointing=True, micro_batch_size=1)
    two_nodes = plan.estimate(shape, job, plan.Cluster(2, 8))
    assert (two_nodes["replicas"], two_nodes["group_size"]) == (2, 8)
    assert two_nodes["traffic_per_step"]["within_node"] > two_nodes["traffic_per_step"]["across_nodes"] > 0
    full = plan.estimate(shape, replace(job, sharding="full"), plan.Cluster(2, 8))
    assert full["group_size"] == 16 and full["traffic_per_step"]["within_node"] == 0
    # 70B full fine-tuning does not fit one node of 8 x 80 GiB; the planner names the change that does.
    big = plan.Job(method="full", activation_checkpointing=True, micro_batch_size=1)
    assert not plan.estimate(plan.MODELS["70B"], big, plan.Cluster(1, 8))["fits"]
    assert plan.suggest(plan.MODELS["70B"], big, plan.Cluster(1, 8)) == "cpu_offload: true"


@pytest.mark.fast
def test_the_loss_block_follows_the_target_tokens_and_gradients_replace_the_backwards_transients():
    """Prompt-heavy rows: the block of logits holds the micro-batch's target tokens, not all its tokens. One
    micro-batch a step: the step's gradients appear as the activations and logits go (the larger of the two
    is the peak); accumulating, the earlier micro-batches' gradients sit under them (both)."""
    shape = replace(plan.MODELS["1B"], tied=False)
    job = plan.Job(method="full", micro_batch_size=4, max_seq_length=256, bf16=False, global_batch_size=4)
    every, few = (
        plan.estimate(shape, replace(job, targets_per_micro_batch=t), plan.Cluster()) for t in (0, 150)
    )
    assert (every["loss_targets"], few["loss_targets"]) == (1024, 150)
    logits = (512 - 150) * shape.vocab * 4  # a block holds loss_chunk_size (512) tokens at most
    assert every["per_rank"]["loss_chunk"] - few["per_rank"]["loss_chunk"] == logits
    parts = few["per_rank"]
    base = parts["weights"] + parts["optimizer_state"] + parts["gathered_layer"]
    transient = parts["activations"] + parts["loss_chunk"]
    assert parts["total"] == base + max(parts["gradients"], transient)
    accumulating = plan.estimate(
        shape, replace(job, global_batch_size=8, targets_per_micro_batch=150), plan.Cluster()
    )
    assert accumulating["per_rank"]["total"] == base + parts["gradients"] + transient


@pytest.mark.fast
def test_the_most_targets_of_a_micro_batch_from_records_or_the_tokenized_cache(tmp_path):
    labels = [[-100, -100, 5, 6], [-100, 7], [-100, -100, -100, 8, 9, 10], [3, 4, 5]]  # 2, 1, 3, 2 targets
    records = [{"input_ids": [1] * len(lab), "labels": lab, "seq_lens": [len(lab)]} for lab in labels]
    data_cache.write_cache({"train": records, "val": []}, tmp_path / "cache")
    split = data_cache.read_cache(tmp_path / "cache")["train"]
    for source in (records, split):
        assert [batching.most_targets(source, n) for n in (1, 2, 9)] == [3, 5, 8]
    assert batching.most_targets([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}], 2) == 0


@pytest.mark.fast
def test_architectures_with_their_own_names_for_the_shape_are_read():
    """gpt2's config.json says n_layer / n_embd / n_head (its attribute_map); the planner reads them as the
    standard names instead of refusing the model."""
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300}
    shape = plan.Shape.from_config(config)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate) == (2, 64, 4, 4, 256)
    with pytest.raises(ValueError, match="lacks a decoder's shape"):
        plan.Shape.from_config({"model_type": "gpt2", "n_layer": 2})


@pytest.mark.fast
def test_docs_scaling_holds_the_planners_table():
    doc = (ROOT / "docs" / "scaling.md").read_text()
    table = re.search(r"<!-- BEGIN plan-table -->\n(.*?)\n<!-- END plan-table -->", doc, re.S).group(1)
    assert table == plan.scaling_table(), "regenerate: python -m pkg.trainer.plan --table"
    assert "python -m pkg.trainer.plan --table" in doc


def test_the_command_line_prints_json_and_refuses_in_one_line(tmp_path, tiny_model, alpaca_data):
    cmd = [sys.executable, "-m", "pkg.trainer.plan", "--model_dir", str(tiny_model), "--method", "full"]
    result = subprocess.run([*cmd, "--nodes", "2", "--gpus-per-node", "2", "--json"], capture_output=True,
                            text=True, cwd=ROOT, check=True)  # fmt: skip
    estimate = json.loads(result.stdout)
    names = {"weights", "trainable_weights", "gradients", "optimizer_state", "gathered_layer", "activations"}
    names |= {
        "activations_no_checkpointing",
        "activations_checkpointing",
        "loss_chunk",
        "vocab_split",
        "total",
    }
    assert names <= set(estimate["per_rank"]) and estimate["fits"] is True
    assert (estimate["replicas"], estimate["group_size"]) == (2, 2)
    assert estimate["loss_targets_from"].startswith("every token of micro_batch_size x max_seq_length")
    text = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "per rank:" in text and "fits" in text and "(the worst case;" in text
    # The loss targets told as a share of the tokens, or measured on the dataset's first rows.
    half = [*cmd, "--target-fraction", "0.5", "--json"]
    half = json.loads(subprocess.run(half, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    assert half["loss_targets"] == half["job"]["micro_batch_size"] * half["job"]["max_seq_length"] // 2
    sample = [*cmd, "--dataset_dir", str(alpaca_data), "--sample-rows", "8"]
    text = subprocess.run(sample, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert f"measured: the most in a micro-batch of the first 8 rows of {alpaca_data}" in text
    missing = ["--model-config", str(tmp_path / "nope.json")]
    bad = subprocess.run([*cmd, *missing], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: cannot read")


def test_the_prediction_of_a_bf16_lora_run_at_two_processes(tmp_path, tiny_model, alpaca_data):
    """The trainer logs the estimate at start; --device cpu's total is within 15% of the measured peak."""
    out = tmp_path / "out"
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "output_dir": out}
    result = run_trainer({**args, "precision": "bf16", "max_steps": 2}, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert re.search(r"sharding auto \(full: 1 copy sharded over 2 ranks\); plan: [\d.,]+ MiB per rank", log)
    # the estimate's loss block holds the most target tokens a micro-batch of the tokenized data has
    [cache] = (out / "cache").glob("tokenized-*")
    targets = batching.most_targets(data_cache.read_cache(cache)["train"], BASE_ARGS["micro_batch_size"])
    assert f"loss targets {targets:,} a micro-batch" in log and targets < 2 * BASE_ARGS["max_seq_length"]
    assert_plan_matches(Path(out), nodes=1, per_node=2)
