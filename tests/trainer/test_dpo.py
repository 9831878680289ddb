"""DPO: the loss and its gradient against a direct implementation with plain transformers; then real
torchrun runs: learning, 1 vs 2 processes, resume at another world size, the full-FT reference cache."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types

import datasets
import pytest
import torch
import torch.nn.functional as F

from pkg.trainer import dpo, model, preference
from pkg.trainer.config import TrainConfig
from tests.trainer.conftest import losses, run_trainer
from tests.trainer.tiny import make_preference_dataset, make_tiny_model, preference_rows


def records_for(tokenizer, cfg: TrainConfig) -> list[dict]:
    rows = preference_rows("strings", 3)
    rows[1]["rejected"] = "no"  # responses and prompts of different lengths: padding must not count
    rows[2]["prompt"] = "Please, " + rows[2]["prompt"]
    records = preference.tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer, cfg)[0]
    # A pair whose prompt fills max_seq_length (tune run's truncation): kept, with no response token.
    long = [{**rows[0], "prompt": "river stone " * 40}, rows[0]]
    cut = dataclasses.replace(cfg, truncation="torchtune", max_seq_length=16)
    empty = preference.tokenize_pairs(datasets.Dataset.from_list(long), tokenizer, cut)[0][0]
    assert (empty["chosen_ids"], empty["rejected_ids"]) == ([], [])
    return [*records[:2], empty, records[2]]


def direct_logp(net, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response | prompt) summed over the response tokens: one sequence, all logits, no trainer code."""
    ids = torch.tensor([prompt + response])
    logprobs = net(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logprobs[len(prompt) - 1 :].sum()


def direct_loss(policy, reference, records: list[dict], cfg: TrainConfig) -> torch.Tensor:
    """The DPO / IPO formula, pair by pair, averaged (over every pair: one without response tokens too, as
    torchtune's loss.mean())."""
    beta, e, out = cfg.dpo_beta, cfg.dpo_label_smoothing, []
    for r in records:
        p, c, rj = r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]
        with torch.no_grad():
            ref_c, ref_r = direct_logp(reference, p, c), direct_logp(reference, p, rj)
        log_ratio_c = direct_logp(policy, p, c) - ref_c
        log_ratio_r = direct_logp(policy, p, rj) - ref_r
        if cfg.dpo_loss == "ipo":
            # A side without tokens: a mean of 0 (dpo.py's convention; torchtune has no IPO)
            h = log_ratio_c / max(len(c), 1) - log_ratio_r / max(len(rj), 1)
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            h = beta * (log_ratio_c - log_ratio_r)
            out.append(-(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h))
    return torch.stack(out).mean()


@pytest.mark.parametrize(
    "settings",
    [
        {"dpo_loss": "sigmoid"},
        {"dpo_loss": "ipo"},
        {"dpo_loss": "sigmoid", "dpo_label_smoothing": 0.2},
        {"dpo_loss": "sigmoid", "method": "full"},
        {"dpo_loss": "sigmoid", "shared_prompt": False},
    ],
    ids=["sigmoid", "ipo", "label-smoothing", "full-cached-reference", "two-rows-per-pair"],
)
def test_loss_and_gradient_equal_the_formula_on_plain_transformers_log_probs(tiny_model, settings):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shared = settings.pop("shared_prompt", True)
    cfg = TrainConfig(
        model_dir=str(tiny_model), objective="dpo", dpo_beta=0.5, lora_rank=4, lora_dropout=0.0, **settings
    ).validate()
    records = records_for(AutoTokenizer.from_pretrained(tiny_model), cfg)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)  # the reference
    net = model.load_model(cfg, torch.device("cpu"))  # the trainer's (LoRA: peft + fused layers)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so the loss is not at its start
        for name, p in net.named_parameters():
            if p.requires_grad and ("lora_B" in name or cfg.method == "full"):
                p.add_(torch.randn_like(p) * 0.05)
    if cfg.method == "full":
        policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        policy.load_state_dict(net.state_dict())
        cached = dpo.reference_logps(
            plain, records, [list(range(len(records)))], torch.device("cpu"), cfg.loss_chunk_size, shared
        )
    else:
        policy = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
            LoraConfig(r=4, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear"),
        )
        policy.load_state_dict(net.state_dict())
        cached = None

    assert dpo.shares_prompt(net) is True  # SDPA, the default attention
    loss_sum, stats = dpo.DPO(cfg, torch.device("cpu"), shared).micro(net, records, cached)
    (loss_sum / len(records)).backward()
    expected = direct_loss(policy, plain, records, cfg)
    expected.backward()

    # fp32: the two computations differ by rounding (fused LoRA GEMMs, logits_to_keep, padding). Measured:
    # loss within 7e-7 relative, gradients within 5e-6 of the largest gradient entry. The tolerances leave a
    # margin of 10-20x and still catch any wrong term (prompt tokens, padding, beta, smoothing: 1e-2 or more).
    assert loss_sum.item() / len(records) == pytest.approx(expected.item(), rel=1e-5)
    assert stats[0] == pytest.approx(loss_sum.item())
    assert abs(expected.item() - dpo_start(cfg)) > 1e-3  # the check is not at the trivial point
    grads = dict(policy.named_parameters())
    compared = 0
    for name, p in net.named_parameters():
        if p.requires_grad:
            want = grads[name].grad
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "two-rows-per-pair"])
def test_prompt_targets_add_one_term_to_both_rewards_and_leave_the_loss(tiny_model, shared):
    """A record's prompt_targets (earlier assistant turns, targets of both responses in torchtune): each
    reward gains beta x the prompt tokens' log-ratio, the same for chosen and rejected, so the loss stays."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = TrainConfig(
        model_dir=str(tiny_model), objective="dpo", dpo_beta=0.5, lora_rank=4, lora_dropout=0.0
    ).validate()
    records = records_for(AutoTokenizer.from_pretrained(tiny_model), cfg)
    net = model.load_model(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
        step = dpo.DPO(cfg, torch.device("cpu"), shared)
        loss, stats = step.micro(net, records)
        targeted = [{**r, "prompt_targets": list(range(1, len(r["prompt_ids"])))} for r in records]
        loss_t, stats_t = step.micro(net, targeted)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        policy = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
            LoraConfig(r=4, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear"),
        )
        policy.load_state_dict(net.state_dict())
        shift = sum(
            cfg.dpo_beta * (direct_logp(policy, r["prompt_ids"][:1], r["prompt_ids"][1:])
                            - direct_logp(plain, r["prompt_ids"][:1], r["prompt_ids"][1:]))
            for r in records
        ).item()  # fmt: skip
    assert loss_t.item() == pytest.approx(loss.item(), rel=1e-5)
    assert abs(shift) > 1e-3
    assert stats_t[1] - stats[1] == pytest.approx(shift, rel=1e-3)  # chosen rewards
    assert stats_t[2] - stats[2] == pytest.approx(shift, rel=1e-3)  # rejected rewards


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "two-rows-per-pair"])
def test_several_loss_chunks_give_the_loss_and_gradients_of_one(tiny_model, shared, monkeypatch):
    """loss_chunk_size reaches DPO's head (policy and reference): 3 target tokens per chunk, recomputed in
    the backward, against one chunk holding every target."""
    from transformers import AutoTokenizer

    results, head_calls = [], []
    linear = F.linear
    for chunk_size in (3, 10_000):
        cfg = TrainConfig(
            model_dir=str(tiny_model), objective="dpo", lora_rank=4, lora_dropout=0.0,
            loss_chunk_size=chunk_size,
        ).validate()  # fmt: skip
        records = records_for(AutoTokenizer.from_pretrained(tiny_model), cfg)
        torch.manual_seed(0)  # the same LoRA A, then the same B, in both models
        net = model.load_model(cfg, torch.device("cpu"))
        with torch.no_grad():  # away from the reference (LoRA B = 0 would make every gradient trivial)
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)
        sizes: list[int] = []
        head = net.get_output_embeddings().weight

        def counting(x, weight, *args, sizes=sizes, head=head, **kwargs):  # the fused head calls F.linear
            if weight is head and x.numel():
                sizes.append(x.shape[:-1].numel())
            return linear(x, weight, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "linear", counting)
        loss_sum, stats = dpo.DPO(cfg, torch.device("cpu"), shared).micro(net, records)
        loss_sum.backward()
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
        grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
        results.append((loss_sum, stats, grads))
        head_calls.append(sizes)

    targets = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records)
    # Reference and policy forwards in chunks of at most 3, and the policy's backward recomputes its chunks.
    assert max(head_calls[0]) <= 3 and sum(head_calls[0]) == 3 * targets
    assert head_calls[1] == [targets] * 3  # one chunk each
    (loss_a, stats_a, grads_a), (loss_b, stats_b, grads_b) = results
    assert loss_a.item() > 0.01 and grads_a.keys() == grads_b.keys()
    # Same fp32 ops, the head's rows batched differently. Measured (both layouts): loss within 1.2e-7
    # relative, metric sums within 3.9e-7, gradients within 8.1e-7 of each tensor's largest entry: ~10x margin
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    assert stats_a == pytest.approx(stats_b, rel=1e-6, abs=5e-6)
    for name, want in grads_b.items():
        torch.testing.assert_close(grads_a[name], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize(
    ("config", "shared"),
    [
        ({"_attn_implementation": "sdpa"}, True),
        ({"_attn_implementation": "eager"}, False),  # eager adds the mask: a boolean one would be wrong
        ({"_attn_implementation": "sdpa", "sliding_window": 4096}, False),  # Mistral v0.1
        (
            {"_attn_implementation": "sdpa", "sliding_window": 4096, "use_sliding_window": False},
            True,
        ),  # Qwen2
        ({"_attn_implementation": "sdpa", "layer_types": ["sliding_attention", "full_attention"]}, False),
    ],
)
def test_the_shared_prompt_layout_only_where_the_attention_keeps_its_meaning(config, shared):
    assert dpo.shares_prompt(types.SimpleNamespace(config=types.SimpleNamespace(**config))) is shared


def dpo_start(cfg: TrainConfig) -> float:
    return (1 / (2 * cfg.dpo_beta)) ** 2 if cfg.dpo_loss == "ipo" else math.log(2)


def test_first_lora_loss_is_exactly_ln2(tiny_model):
    from transformers import AutoTokenizer

    cfg = TrainConfig(model_dir=str(tiny_model), objective="dpo", lora_rank=4).validate()
    records = records_for(AutoTokenizer.from_pretrained(tiny_model), cfg)
    net = model.load_model(cfg, torch.device("cpu"))
    loss_sum, stats = dpo.DPO(cfg, torch.device("cpu")).micro(net, records)
    # LoRA starts with B = 0: the policy's log-probs are the reference's bit for bit, so h = 0.
    assert stats[1:4] == [0.0, 0.0, 0.0]
    assert loss_sum.item() == pytest.approx(len(records) * math.log(2), rel=1e-7)


# ---------------------------------------------------------------- real runs

ARGS = {
    "objective": "dpo",
    "max_steps": 8,
    "global_batch_size": 16,
    "micro_batch_size": 4,
    "learning_rate": 5e-3,
    "lr_scheduler": "constant",
    "lora_dropout": 0.0,
    "lora_rank": 8,
    "val_fraction": 0.125,
    "max_seq_length": 128,
    "save_every": 4,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    # A larger init gives LoRA room to move the frozen head's logits (demo/tiny_model.py).
    return make_tiny_model(root / "model", init_std=0.1), make_preference_dataset(
        root / "pairs", "strings", n=96
    )


def records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_process_lora_learns_equals_one_process_and_resumes_at_another_world_size(tmp_path, setup):
    model_dir, pairs = setup
    args = {**ARGS, "model_dir": model_dir, "dataset_dir": pairs, "merge_adapter": True}
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    result = run_trainer({**args, "output_dir": two}, nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "reward_accuracy" in next(line for line in result.stdout.splitlines() if "step 8/8 | loss" in line)

    train = [r for r in records(two) if "loss" in r]
    assert train[0]["loss"] == round(math.log(2), 6)  # policy == reference before the first update
    assert train[0]["reward_margin"] == 0.0
    # Chance is 0.5 (0 at step 1, where every reward is 0); the rule is learnt within a few steps
    # (measured: 0.875, 1, 1 over steps 6-8; margin 0.05 at step 3, 1.26 at step 8).
    assert sum(r["reward_accuracy"] for r in train[-3:]) / 3 >= 0.85, train
    assert train[-1]["reward_margin"] > train[2]["reward_margin"] + 0.5, train
    assert train[-1]["loss"] < 0.5
    val = [r for r in records(two) if "val_loss" in r]
    assert val[-1]["val_reward_accuracy"] >= 0.75 and "val_reward_margin" in val[-1]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["final_reward_accuracy"] == train[-1]["reward_accuracy"]
    assert "dpo_beta=0.1" in summary["fingerprint"]["objective"]
    assert (two / "adapter" / "adapter_model.safetensors").exists() and (
        two / "model" / "config.json"
    ).exists()
    assert (two / "loss.png").stat().st_size > 0

    # One process: the same pairs per step, the same mean over the global batch.
    result = run_trainer({**args, "output_dir": one, "save_every": 0, "merge_adapter": False})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    torch.testing.assert_close(losses(one), losses(two), rtol=2e-5, atol=2e-5)

    # Resume the 2-process run's step-4 checkpoint in one process: steps 5-8 as if never interrupted.
    resumed.mkdir()
    shutil.copytree(two / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    shutil.copy(two / "metrics.jsonl", resumed / "metrics.jsonl")
    result = run_trainer({**args, "output_dir": resumed, "merge_adapter": False})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "resuming from step 4 of 8" in result.stdout
    torch.testing.assert_close(losses(resumed), losses(two), rtol=2e-5, atol=2e-5)
    assert [r["step"] for r in records(resumed) if "loss" in r] == list(range(1, 9))


def test_full_finetuning_caches_the_reference_log_probs_once(tmp_path, setup):
    model_dir, pairs = setup
    args = {**ARGS, "model_dir": model_dir, "dataset_dir": pairs, "output_dir": tmp_path, "method": "full"}
    args.update(max_steps=2, learning_rate=1e-4, save_every=2)
    result = run_trainer(args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "reference log-probs of 96 pairs computed" in result.stdout
    [cache] = (tmp_path / "cache").glob("reference-*.pt")
    cached = torch.load(cache, weights_only=True)
    assert cached["train"].shape == (84, 2) and cached["val"].shape == (12, 2)
    assert (cached["train"] < 0).all()
    first = losses(tmp_path)[0]
    # The reference pass pads its batches differently from the training step: equal up to fp32 rounding.
    assert first == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "model" / "config.json").exists()

    # A longer run resumes from the checkpoint and reuses the cache (the trained model is no reference).
    result = run_trainer({**args, "max_steps": 3})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "resuming from step 2" in result.stdout and "reference log-probs" not in result.stdout
    assert len(losses(tmp_path)) == 3


def test_full_finetuning_against_another_reference_model(tmp_path, setup):
    """reference_model_dir (torchtune's ref_checkpointer): the reference log-probs are that model's, the same
    as when it is the starting model itself, and the first loss is no longer ln 2. A quarter of the pairs
    have prompts that fill max_seq_length (tune run's truncation): kept, as torchtune keeps them, so the
    first loss is the formula's mean over all 16 pairs, theirs ln 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = setup
    rows = preference_rows("strings", 16)
    for row in rows[::4]:
        row["prompt"] = "river stone " * 100 + row["prompt"]
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = make_tiny_model(tmp_path / "reference", init_std=0.1, seed=1)
    args = {**ARGS, "dataset_dir": pairs, "method": "full", "max_steps": 1, "save_every": 0}
    args.update(val_fraction=0.0, truncation="torchtune")  # the global batch of 16: every pair
    result = run_trainer({**args, "model_dir": model_dir, "reference_model_dir": reference,
                          "output_dir": tmp_path / "other"})  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"DPO reference: the model of {reference}" in result.stdout
    assert "4 of 16 pairs have no chosen or rejected token within max_seq_length=128; kept" in result.stdout
    assert "format preference: 16 train, 0 val pairs" in result.stdout
    cfg = TrainConfig(model_dir=str(model_dir), objective="dpo", truncation="torchtune", max_seq_length=128)
    records = preference.tokenize_pairs(
        datasets.Dataset.from_list(rows), AutoTokenizer.from_pretrained(model_dir), cfg
    )[0]
    assert sum(not r["chosen_ids"] for r in records) == 4
    with torch.no_grad():
        policy, ref = (
            AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32) for m in (model_dir, reference)
        )
        expected = direct_loss(policy, ref, records, cfg).item()
    assert abs(expected - math.log(2)) > 1e-3
    # Measured 3.5e-7 apart (metrics.jsonl rounds to 6 decimals; the reference pass pads differently).
    assert losses(tmp_path / "other")[0] == pytest.approx(expected, abs=1e-5)
    result = run_trainer({**args, "model_dir": reference, "output_dir": tmp_path / "itself"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    [other] = (tmp_path / "other" / "cache").glob("reference-*.pt")
    [itself] = (tmp_path / "itself" / "cache").glob("reference-*.pt")
    for split in ("train", "val"):
        torch.testing.assert_close(
            torch.load(other, weights_only=True)[split], torch.load(itself, weights_only=True)[split]
        )
