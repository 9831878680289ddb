"""End to end under real torchrun (gloo, FSDP2): LoRA and full runs, equivalence across world sizes and nodes,
exported adapter and models reproduce the trained weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pkg.trainer import data_cache
from tests.trainer.conftest import (
    BASE_ARGS,
    LOSS_TOL,
    VAL_LOSS_REL,
    assert_same_adapter,
    check_exported_adapter,
    cli,
    losses,
    ok,
    run_trainer,
    two_nodes,
    val_loss,
)
from tests.trainer.plan_check import assert_plan_matches
from tests.trainer.tiny import make_dataset


def test_lora_one_process_two_processes_and_two_nodes_agree(tmp_path, tiny_model, alpaca_data):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "merge_adapter": True}
    one, two, nodes = tmp_path / "one", tmp_path / "two", tmp_path / "nodes"
    ok(run_trainer({**args, "output_dir": one}))
    result = run_trainer({**args, "output_dir": two}, nproc=2)
    ok(result)
    for r in two_nodes(["-m", "pkg.trainer", *cli({**args, "output_dir": nodes})]):
        ok(r)

    # Progress lines come from rank 0 only.
    lines = [line for line in result.stdout.splitlines() if "step 8/8 | loss=" in line]
    assert len(lines) == 1 and "tokens_per_s=" in lines[0] and "eta" in lines[0]

    # Same global batches and a token-weighted global loss: the world size does not change the numbers.
    reference = losses(one)
    assert len(reference) == 8
    torch.testing.assert_close(losses(two), reference, **LOSS_TOL)
    torch.testing.assert_close(losses(nodes), reference, **LOSS_TOL)
    assert reference[-1] < reference[0] - 0.3, reference  # it learns
    for out, n, per_node in ((one, 1, 1), (two, 1, 2), (nodes, 2, 1)):  # the planner vs rank 0's peak
        assert_plan_matches(out, n, per_node)

    # Outputs.
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (two / name).stat().st_size > 0, name
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8 and summary["final_val_loss"] > 0
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    assert not list(two.glob(".*tmp*")), "temporary folders left behind"

    # The adapter is complete (every LoRA matrix at full size), not one rank's slice, and equal across runs.
    weights = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    config = json.loads((two / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    fresh = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    expected = {k: v.shape for k, v in get_peft_model_state_dict(fresh).items()}
    assert len(expected) == 2 * 7 * 2  # 2 layers x 7 linear modules x (A, B)
    assert {k: v.shape for k, v in weights.items()} == expected
    reference_weights = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert_same_adapter(weights, reference_weights)
    assert_same_adapter(load_file(str(nodes / "adapter" / "adapter_model.safetensors")), reference_weights)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())

    # Loaded with peft, the adapter reproduces the run's final validation loss; the merged model, loaded by
    # transformers alone, equals base + adapter.
    check_exported_adapter(tiny_model, two, summary["final_val_loss"])
    assert (two / "model" / "tokenizer.json").exists()


def test_full_finetuning_packed_chat_two_processes_with_activation_checkpointing(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = make_dataset(tmp_path / "chat", "messages", "parquet", n=96)
    out = tmp_path / "out"
    args = {
        **BASE_ARGS,
        "model_dir": tiny_model,
        "dataset_dir": dataset,
        "output_dir": out,
        "method": "full",
        "packing": True,
        "learning_rate": 3e-3,
        "global_batch_size": 4,
        "max_steps": 6,
        "eval_every": 3,
        # A checkpoint right after validation: the optimizer and the checkpoint must still see the model's
        # parameter objects (FSDP2 kept the root's weights gathered after a forward without a backward).
        "save_every": 3,
        "activation_checkpointing": True,
    }
    result = run_trainer(args, nproc=2)
    ok(result)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-3",
        "step-6",
    ]
    trained = losses(out)
    assert trained[-1] < trained[0] - 0.3, trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "full" and summary["trainable_params"] == summary["total_params"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]

    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(str(out / "model")).chat_template
    assert val_loss(model, out, packing=True) == pytest.approx(summary["final_val_loss"], rel=VAL_LOSS_REL)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert val_loss(base, out, packing=True) > summary["final_val_loss"] + 0.3


def test_full_finetuning_with_the_vocabulary_split_or_not_equals_one_process(
    tmp_path, tiny_model, alpaca_data
):
    """vocab_parallel: the embedding and head split by vocabulary rows (always) or FSDP units (never) give one
    process's losses and weights, through training, validation and the streamed export."""
    from safetensors.torch import load_file

    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "method": "full"}
    args.update(learning_rate=2e-3, max_steps=4)
    runs = {"one": 1, "always": 2, "never": 2}
    for name, nproc in runs.items():
        extra = {"vocab_parallel": name} if nproc == 2 else {}
        result = run_trainer({**args, **extra, "output_dir": tmp_path / name}, nproc=nproc)
        ok(result)
        log = result.stdout + result.stderr
        split = "vocab_parallel: VocabParallelEmbedding, VocabParallelHead" in log
        assert split == ("vocab_parallel:" in log) == (name == "always"), name  # one fp32 process: unsharded
    reference = losses(tmp_path / "one")
    reference_val = json.loads((tmp_path / "one" / "summary.json").read_text())["final_val_loss"]
    weights = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    for name in ("always", "never"):
        torch.testing.assert_close(losses(tmp_path / name), reference, **LOSS_TOL)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["final_val_loss"] == pytest.approx(reference_val, rel=VAL_LOSS_REL)
        assert_same_adapter(load_file(str(tmp_path / name / "model" / "model.safetensors")), weights)


def test_full_fine_tuning_at_two_processes_evaluates_a_rank_whose_batch_is_all_padding(tmp_path, tiny_model):
    # 6 validation rows over 2 ranks in micro-batches of 2: rank 1's second batch is padding only (no target
    # token). The head is an FSDP unit (vocab_parallel: never): every rank must gather it as often.
    data = make_dataset(tmp_path / "data", n=48)
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": data, "output_dir": tmp_path / "out"}
    args.update(method="full", max_steps=1, eval_every=1, vocab_parallel="never", dist_timeout_minutes=1)
    result = run_trainer(args, nproc=2)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "42 train / 6 val sequences" in log and "step 1/1 | val_loss=" in log, log[-3000:]


def test_rows_without_a_target_are_kept_and_steps_follow_the_rows(tmp_path, tiny_model):
    # 36 rows, 12 of them with a prompt that fills max_seq_length (no target), in file order (shuffle off),
    # global batches of 8 over 2 ranks in micro-batches of 2. torchtune keeps such rows: 36 // 8 = 4 steps
    # (dropping them would give 3). Step 1: rank 0 holds rows 0-3, three without a target, so one of its
    # micro-batches has none while rank 1's have some; step 2 has no target at all: no update, no loss.
    from transformers import AutoModelForCausalLM

    from pkg.trainer.optim import BETAS
    from tests.trainer.tiny import rows

    no_target = {0, 1, 2, *range(8, 16), 20}
    data = [
        {"prompt": "Repeat: " + "river stone " * 40, "completion": r["completion"]} if i in no_target else r
        for i, r in enumerate(rows("prompt_completion", 36))
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "out"
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": tmp_path / "data", "output_dir": out}
    args.update(method="full", max_steps=0, num_epochs=1, shuffle=False, val_fraction=0, max_seq_length=32)
    args.update(learning_rate=1e-3, lr_scheduler="constant", max_grad_norm=0)
    log = ok(run_trainer(args, nproc=2))
    assert "12 of 36 rows have no target token within max_seq_length=32: kept" in log
    assert "step 2: no row of its batch has a target token; its update is skipped" in log
    trained = losses(out)
    assert len(trained) == 4 and trained[1] is None, trained

    # The same steps with plain transformers: each row alone through the whole model, its full logits'
    # cross-entropy summed over the batch's target tokens and divided by their count; AdamW as the trainer's.
    [cache] = (out / "cache").glob("tokenized-*")
    records = data_cache.read_cache(cache)["train"]
    assert len(records) == 36
    net = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adam = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=BETAS, weight_decay=0.0, fused=True)
    expected = []
    for step in range(4):
        total, count = torch.zeros(()), 0
        for rec in [records[i] for i in range(step * 8, step * 8 + 8)]:
            ids = torch.tensor([rec["input_ids"]], dtype=torch.long)
            labels = torch.tensor(rec["labels"][1:], dtype=torch.long)
            logits = net(input_ids=ids).logits[0, :-1]
            total = total + F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            count += int((labels != -100).sum())
        if not count:
            expected.append(None)
            continue
        loss = total / count
        expected.append(loss.item())
        loss.backward()
        adam.step()
        adam.zero_grad()
    assert expected[1] is None
    torch.testing.assert_close(
        [x for x in trained if x is not None], [x for x in expected if x is not None], **LOSS_TOL
    )
