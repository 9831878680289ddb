"""DPO (`objective: dpo`): response log-probabilities, the reference model, and the preference loss.

Per pair, with policy and reference log-probabilities of the chosen (c) and rejected (r) responses summed
over their tokens (prompt tokens never count):

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    sigmoid (DPO):  loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)    e = dpo_label_smoothing
    ipo:            loss = (h' - 1 / (2 beta))^2   with h' the same difference of per-token mean log-ratios
                    (IPO on sums grows with the response length; the mean is what the IPO authors use)
    rewards:        beta (log pi - log ref) of each response; margin = chosen - rejected;
                    accuracy = the fraction of pairs with chosen > rejected
    a side without response tokens (its prompt fills max_seq_length): log-probability 0, as torchtune's masked
    sum; a pair with neither has h = 0: loss ln 2 (IPO 1 / (4 beta^2)), rewards 0, not accurate, no
    gradient, and counts in the mean over the pairs as in torchtune's loss.mean()

The reference:
- LoRA / QLoRA: the same model with its adapter disabled (peft's `disable_adapter`), run under no_grad on
  the same batch: no second copy of the weights. LoRA starts at B = 0, so the first loss is ln 2 exactly.
- Full fine-tuning: the reference log-probs of every pair are computed once, before the first update (the
  model then *is* the reference), by all ranks together, and cached next to the tokenized data
  (`reference_cache`). A frozen second copy would add a whole model's parameters to every rank's memory and
  a forward pass to every micro-batch of every epoch; the cache costs one forward pass over the data set,
  once, and 16 bytes per pair. Resume and later epochs reuse it.

Chosen and rejected go through the model in one forward pass per micro-batch, sharing one pass over their
prompt where the attention takes a custom mask (preference.collate_pairs). `DPO` is the objective the recipe
trains with (objective.py's interface); preference.py reads and tokenizes the pairs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pkg.trainer import data_cache, distributed, preference
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError
from pkg.trainer.files import atomic_file, dir_digest
from pkg.trainer.loss import IGNORE_INDEX, token_logprobs
from pkg.trainer.objective import Micro, Setup, means

log = logging.getLogger(__name__)

# What train and validation report, each the mean over the pairs of the whole global batch (or val set).
METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def shares_prompt(model: torch.nn.Module) -> bool:
    """Whether to use the shared-prompt layout: SDPA attention (which takes its boolean mask) and no
    sliding-window layers (transformers applies a custom mask as given, so it would drop their window)."""
    config = model.config
    sliding = any("sliding" in str(t) for t in getattr(config, "layer_types", None) or [])
    sliding |= bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    return getattr(config, "_attn_implementation", None) == "sdpa" and not sliding


MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")  # of a collate_pairs batch


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probability, response token count) per output row of a collate_pairs batch.

    The output head runs only at the positions that predict a response token, `chunk_size` of them at a
    time (loss.token_logprobs: the one place that touches the head), with fp32 logits.
    """
    targets = batch["targets"]
    out, j = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # output row, response token
    where = (batch["rows"][out], batch["positions"][out, j], targets[out, j])
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    scored = token_logprobs(model, inputs, chunk_size, where)
    # Summed per output row (chosen and rejected of a shared-prompt pair are one input row).
    sums = dataclasses.replace(scored, rows=out).per_sequence(targets.size(0))
    return sums, (targets != IGNORE_INDEX).sum(dim=1)


def preference_loss(
    policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward) from [2B] log-probs ordered chosen then rejected."""
    ratios = policy - reference
    chosen, rejected = ratios.chunk(2)
    if cfg.dpo_loss == "ipo":
        n_chosen, n_rejected = counts.clamp(min=1).chunk(2)  # a side without tokens: a mean of 0
        h = chosen / n_chosen - rejected / n_rejected
        losses = (h - 1 / (2 * cfg.dpo_beta)) ** 2
    else:
        h = cfg.dpo_beta * (chosen - rejected)
        e = cfg.dpo_label_smoothing
        losses = -(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h) if e else -F.logsigmoid(h)
    return losses, cfg.dpo_beta * chosen.detach(), cfg.dpo_beta * rejected.detach()


class DPO:
    """The DPO objective (objective.py's interface): one micro-batch's summed loss and its metric sums."""

    metrics = METRICS
    build_splits = staticmethod(preference.build_splits)

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        shared_prompt: bool = True,
        reference: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.shared_prompt = shared_prompt  # preference.collate_pairs' layout
        # Full fine-tuning: the reference log-probs of every pair, [N, 2] per split (reference_cache);
        # LoRA / QLoRA: none, the reference is the model with its adapter disabled.
        self.reference = reference or {}

    @classmethod
    def create(cls, setup: Setup) -> DPO:
        shared = shares_prompt(setup.model)
        reference = reference_cache(setup, shared) if setup.cfg.method == "full" else None
        return cls(setup.cfg, setup.dist.device, shared, reference)

    def count(self, records: list[dict]) -> tuple[int, int]:
        return len(records), preference.count_tokens(records)  # the loss is the mean over the pairs

    def micro_loss(self, model: torch.nn.Module, records: list[dict], indices: list[int]) -> Micro:
        loss, sums = self.micro(model, records, self.cached("train", indices))
        return Micro(loss, sums, None)  # no router loss under DPO (docs/trainer.md: known limits)

    def evaluate(self, model: torch.nn.Module, records: Any, batches: list[list[int]]) -> dict[str, float]:
        """The means of METRICS over the held-out pairs, prefixed val_ (the padding pairs, -1, weigh 0)."""
        totals = [0.0] * len(METRICS)
        for mb in batches:
            recs = [records[max(i, 0)] for i in mb]
            weights = torch.tensor([float(i >= 0) for i in mb])
            sums = self.micro(model, recs, self.cached("val", mb), weights)[1]
            totals = [a + b for a, b in zip(totals, sums, strict=True)]
        return means(METRICS, distributed.all_reduce_sum(totals, self.device), len(records), "val_")

    def cached(self, split: str, indices: list[int]) -> torch.Tensor | None:
        """[B, 2] cached reference log-probs of these records of `split` (full fine-tuning), else None."""
        if split not in self.reference:
            return None
        return self.reference[split][[max(i, 0) for i in indices]]

    def adapter_reference(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference log-probs of a batch: the model with its LoRA adapter disabled."""
        with torch.no_grad(), model.disable_adapter():
            return sequence_logps(model, batch, self.cfg.loss_chunk_size)[0]

    def micro(
        self,
        model: torch.nn.Module,
        records: Sequence[dict],
        cached: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[float]]:
        """(summed loss over the pairs, sums of METRICS) of one micro-batch.

        `cached`: [B, 2] reference log-probs (full fine-tuning); `weights`: 1 for real pairs, 0 for the
        padding of a validation batch.
        """
        pairs = preference.collate_pairs(records, self.shared_prompt)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in pairs.items()}
        if cached is None:
            ref = self.adapter_reference(model, batch)
        else:
            ref = cached.to(self.device, torch.float32).t().reshape(-1)  # chosen column, then rejected
        policy, counts = sequence_logps(model, batch, self.cfg.loss_chunk_size)
        losses, chosen, rejected = preference_loss(policy, ref, counts, self.cfg)
        if weights is not None:
            weights = weights.to(self.device)
            losses = losses * weights
            chosen, rejected = chosen * weights, rejected * weights
        loss = losses.sum()
        wins = (chosen > rejected).float() * (weights if weights is not None else 1.0)
        stats = [loss.item(), chosen.sum().item(), rejected.sum().item(), (chosen - rejected).sum().item()]
        return loss, [*stats, wins.sum().item()]


# ---------------------------------------------------------------- full fine-tuning: the cached reference


def reference_cache(setup: Setup, shared_prompt: bool) -> dict[str, torch.Tensor]:
    """Full-FT DPO: the reference log-probs of every pair ({"train", "val"}: [N, 2]), computed once and kept
    with the tokenized data. The reference is the starting model (`setup.model`, before any update) or the
    model of reference_model_dir, built only when its log-probs are not cached yet.

    Keyed by the data cache and the reference model's content digest. All ranks compute together when any
    rank lacks the file; each node's first rank writes it (atomically), as for the tokenized data.
    """
    cfg, info = setup.cfg, setup.dist
    ref_dir = cfg.reference_model_dir or cfg.model_dir
    key = f"{data_cache.cache_key(cfg, cfg.model_dir)}-{dir_digest(ref_dir)}"
    path = setup.out / "cache" / f"reference-{key}.pt"
    (missing,) = distributed.all_reduce_sum([0.0 if path.exists() else 1.0], info.device)
    if not missing:  # every rank reads the cache: no model needed
        return torch.load(path, weights_only=True)
    net = setup.model if ref_dir == cfg.model_dir else reference_model(setup, ref_dir)
    started, cpu = time.monotonic(), time.process_time()
    splits = {}
    for name, records in (("train", setup.train_data), ("val", setup.val_data)):
        # Pairs of similar length together (less padding); -1 pads so every rank runs as many passes.
        lengths = [sum(lens) for lens in records["seq_lens"]] if len(records) else []
        order = sorted(range(len(records)), key=lengths.__getitem__)
        batches = [[order[i] if i >= 0 else -1 for i in mb] for mb in setup.plan.val_batches(len(records))]
        splits[name] = reference_logps(net, records, batches, info.device, cfg.loss_chunk_size, shared_prompt)
    log.info(
        "reference log-probs of %d pairs computed in %.1f s, %.1f s CPU (cached in %s)",
        len(setup.train_data) + len(setup.val_data), time.monotonic() - started,
        time.process_time() - cpu, path,
    )  # fmt: skip
    if info.local_rank == 0:
        with atomic_file(path) as tmp:
            torch.save(splits, tmp)
    return splits


def reference_model(setup: Setup, ref_dir: str) -> torch.nn.Module:
    """The model of reference_model_dir, built as the policy was, in eval mode (same vocabulary required)."""
    log.info("DPO reference: the model of %s (reference_model_dir)", ref_dir)
    ref = setup.build_model(ref_dir)
    vocab = setup.model.config.vocab_size
    if ref.config.vocab_size != vocab:
        raise TrainerError(
            f"reference_model_dir {ref_dir}: vocabulary of {ref.config.vocab_size} tokens, the model's "
            f"has {vocab}; DPO compares both on the same tokens (same tokenizer)"
        )
    ref.eval()
    return ref


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    records: Sequence[dict],
    batches: list[list[int]],
    device: torch.device,
    chunk_size: int,
    shared_prompt: bool = True,
) -> torch.Tensor:
    """[N, 2] float64 (chosen, rejected) log-probs of every record under `model`; collective.

    `batches` is this rank's share of the indices (BatchPlan.val_batches: -1 pads, so every rank runs the
    same number of forward passes, as FSDP needs); each pair is computed by one rank, then summed over ranks.
    """
    model.eval()
    out = torch.zeros(len(records), 2, dtype=torch.float64, device=device)
    for mb in batches:
        recs = [records[max(i, 0)] for i in mb]
        batch = {k: v.to(device) for k, v in preference.collate_pairs(recs, shared_prompt).items()}
        chosen, rejected = sequence_logps(model, batch, chunk_size)[0].double().chunk(2)
        for j, i in enumerate(mb):
            if i >= 0:
                out[i, 0], out[i, 1] = chosen[j], rejected[j]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out.cpu()
