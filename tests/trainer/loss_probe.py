"""Tiny models and batches for the chunked-loss tests, and a torchrun probe that checks it under FSDP2.

    torchrun --nproc-per-node 2 tests/trainer/loss_probe.py REPORT.json CASE [CASE ...]

CASE: one of CASES, `full-` in front for full fine-tuning (no LoRA), `vp-` in front (first) for the input
embedding and head split by vocabulary rows (vocab_parallel.py) rather than FSDP units, `empty-` in front
(before all) for a last rank whose batch has no target tokens (all padding: its collectives must still
match the other ranks').
Every rank builds the same model; one copy is sharded with the trainer's FSDP2 `shard`, the other stays
whole. Each rank runs the chunked loss on a batch of its own (with its own number of target tokens); the
sharded gradients (FSDP averages them over ranks) must equal the mean of the full-logits path's gradients
over every rank's batch, computed whole. One report per case: REPORT-CASE-rankR.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pkg.trainer.loss import IGNORE_INDEX

VOCAB = 301  # odd: split over 2 ranks, the vocabulary shards are uneven
CASES = ["untied", "tied", "untied-lora-head", "tied-lora-head", "softcap", "softcap-lora-head", "bias"]


def build(case: str, lora: bool = True) -> torch.nn.Module:
    """A random 2-layer model: Llama (tied or not), Gemma 2 (`softcap`, tied, final logit soft-capping) or
    Phi (`bias`: a head with a bias)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    common.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if case.startswith("softcap"):
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0, tie_word_embeddings=True)
        net = Gemma2ForCausalLM(config)
    elif case == "bias":
        net = PhiForCausalLM(PhiConfig(**common, tie_word_embeddings=False))
    else:
        net = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=case.startswith("tied")))
    net.config.use_cache = False
    if not lora:
        return net
    from peft import LoraConfig, get_peft_model

    from pkg.trainer import fused_lora

    targets = ["q_proj", "v_proj"] + ["lm_head"] * case.endswith("lora-head")
    net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, p in net.named_parameters():  # lora_B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    fused_lora.install(net)
    return net


def batch(seed: int = 1, empty: bool = False) -> dict[str, torch.Tensor]:
    """3 rows of different lengths, right-padded, with prompts masked (targets start at different places);
    each seed its own number of targets (none when `empty`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels = ids.clone()
    for row, (prompt, length) in enumerate([(3, 20), (11, 17), (6 + seed % 5, 9 + seed % 7)]):
        labels[row, :prompt] = IGNORE_INDEX
        labels[row, length:] = IGNORE_INDEX
    if empty:
        labels[:] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def full_logits_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: every position's fp32 logits from the model's own forward, summed cross-entropy."""
    logits = model(input_ids=b["input_ids"], use_cache=False).logits.float()[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )  # fmt: skip


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def check(info, case: str) -> dict:
    """One case: the sharded model's loss and gradients against the whole model's."""
    from pkg.trainer import distributed
    from pkg.trainer.loss import check_head, chunked_loss_sum

    empty = case.startswith("empty-")  # the last rank's batch: no target tokens
    vocab_parallel = case.removeprefix("empty-").startswith("vp-")
    name = case.removeprefix("empty-").removeprefix("vp-")
    method = "full" if name.startswith("full-") else "lora"
    name = name.removeprefix("full-")
    reference = build(name, lora=method == "lora")
    how = distributed.Sharding(info.device, bf16=False, vocab_parallel=vocab_parallel)
    sharded = distributed.shard(copy.deepcopy(reference), how)
    check_head(sharded, info.device)
    with torch.no_grad():  # the model's own forward: whole logits, through a vocabulary-sharded head too
        ids = batch(1 + info.rank)["input_ids"][:, : 8 + info.rank]
        whole = reference(input_ids=ids, logits_to_keep=3).logits
        split = sharded(input_ids=ids, logits_to_keep=3).logits
        distributed.reshard(sharded)
    logits_error = ((split - whole).abs().max() / whole.abs().max()).item()

    def rank_batch(rank: int) -> dict[str, torch.Tensor]:
        return batch(1 + rank, empty=empty and rank == info.world_size - 1)

    b = rank_batch(info.rank)
    ref_loss = full_logits_loss(reference, b).detach()
    for rank in range(info.world_size):  # FSDP's gradient: the mean over the ranks' batches
        (full_logits_loss(reference, rank_batch(rank)) / info.world_size).backward()
    loss = chunked_loss_sum(sharded, b, chunk_size=7)
    loss.backward()
    expected, got = grads(reference), grads(sharded)
    assert expected.keys() == got.keys(), (sorted(expected), sorted(got))
    errors = {n: ((got[n] - expected[n]).abs().max() / expected[n].abs().max().clamp_min(1e-12)).item()
              for n in expected}  # fmt: skip
    split = {type(m).__name__ for m in sharded.modules() if type(m).__name__.startswith("VocabParallel")}
    return {
        "rank": info.rank,
        "world_size": info.world_size,
        "sharded": any(hasattr(p, "to_local") for p in sharded.parameters()),
        "vocab_parallel": sorted(split),
        "loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "max_rel_grad_error": max(errors.values()),
        "logits_error": logits_error,
        "grads": len(errors),
    }


def main(report: str, cases: list[str]) -> None:
    import torch.distributed as dist

    from pkg.trainer import distributed

    info = distributed.init(5)
    for case in cases:
        result = check(info, case)
        Path(report).with_name(f"{Path(report).stem}-{case}-rank{info.rank}.json").write_text(
            json.dumps(result)
        )
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    from pkg.trainer.distributed import exit_process

    exit_process(0)
