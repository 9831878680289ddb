"""DPO (`objective: dpo`): response log-probabilities, the reference model, and the preference loss.

Per pair, with policy and reference log-probabilities of the chosen (c) and rejected (r) responses summed
over their tokens (prompt tokens never count):

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    sigmoid (DPO):  loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)    e = dpo_label_smoothing
    ipo:            loss = (h' - 1 / (2 beta))^2   with h' the same difference of per-token mean log-ratios
                    (IPO on sums grows with the response length; the mean is what the IPO authors use)
    rewards:        beta (log pi - log ref) of each response; margin = chosen - rejected;
                    accuracy = the fraction of pairs with chosen > rejected

The reference:
- LoRA / QLoRA: the same model with its adapter disabled (peft's `disable_adapter`), run under no_grad on
  the same batch: no second copy of the weights. LoRA starts at B = 0, so the first loss is ln 2 exactly.
- Full fine-tuning: the reference log-probs of every pair are computed once, before the first update (the
  model then *is* the reference), by all ranks together, and cached next to the tokenized data
  (`reference_logps`). A frozen second copy would add a whole model's parameters to every rank's memory and
  a forward pass to every micro-batch of every epoch; the cache costs one forward pass over the data set,
  once, and 16 bytes per pair. Resume and later epochs reuse it.

Chosen and rejected go through the model in one forward pass per micro-batch, sharing one pass over their
prompt where the attention takes a custom mask (preference.collate_pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pkg.trainer import preference
from pkg.trainer.config import TrainConfig
from pkg.trainer.loss import IGNORE_INDEX, token_logprobs

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
        n_chosen, n_rejected = counts.chunk(2)
        h = chosen / n_chosen - rejected / n_rejected
        losses = (h - 1 / (2 * cfg.dpo_beta)) ** 2
    else:
        h = cfg.dpo_beta * (chosen - rejected)
        e = cfg.dpo_label_smoothing
        losses = -(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h) if e else -F.logsigmoid(h)
    return losses, cfg.dpo_beta * chosen.detach(), cfg.dpo_beta * rejected.detach()


class DPO:
    """The DPO side of a training step: one micro-batch's summed loss and its metric sums."""

    def __init__(self, cfg: TrainConfig, device: torch.device, shared_prompt: bool = True) -> None:
        self.cfg = cfg
        self.device = device
        self.shared_prompt = shared_prompt  # preference.collate_pairs' layout

    def reference(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
            ref = self.reference(model, batch)
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


def metrics(sums: Sequence[float], pairs: float, prefix: str = "") -> dict[str, float]:
    return {prefix + name: value / max(pairs, 1) for name, value in zip(METRICS, sums, strict=True)}


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
