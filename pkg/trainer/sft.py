"""Supervised fine-tuning (`objective: sft`, the default): cross-entropy on the target tokens.

The loss of a step is the token-weighted mean over the whole global batch: each micro-batch returns its
summed token losses (chunked through the output head, loss.py: no full logits) and the recipe divides by
the all-reduced count of target tokens (`count`), so 1 and N processes give the same loss and gradients.
An MoE model also returns its router load-balancing loss while training; the recipe adds it with the
model's coefficient (model.router_aux_coef). Which tokens are targets (prompt masking, packing) is decided
when the data is tokenized (data.py).
"""

from __future__ import annotations

from typing import Any

import torch

from pkg.trainer import batching, data, distributed
from pkg.trainer.config import TrainConfig
from pkg.trainer.loss import IGNORE_INDEX, token_logprobs
from pkg.trainer.objective import Micro, Setup, means


class SFT:
    """The SFT objective (objective.py's interface)."""

    metrics = ("loss",)
    build_splits = staticmethod(data.build_splits)

    def __init__(self, cfg: TrainConfig, device: torch.device, pad_token_id: int, router_loss: bool) -> None:
        self.cfg = cfg
        self.device = device
        self.pad_token_id = pad_token_id
        self.router_loss = router_loss

    @classmethod
    def create(cls, setup: Setup) -> SFT:
        return cls(setup.cfg, setup.dist.device, setup.pad_token_id, setup.router_loss)

    def count(self, records: list[dict]) -> tuple[int, int]:
        return batching.count_targets(records), sum(len(r["input_ids"]) for r in records)

    def loss_sum(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed cross-entropy of the target tokens of a collated batch, and the router's load-balancing
        loss when an MoE model trains (None otherwise)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        moe = {"output_router_logits": True} if self.router_loss and model.training else {}
        scored = token_logprobs(model, batch, self.cfg.loss_chunk_size, **moe)
        return -scored.logprobs.sum(), scored.aux_loss if moe else None

    def micro_loss(self, model: torch.nn.Module, records: list[dict], indices: list[int]) -> Micro:
        loss, router = self.loss_sum(model, self.collate(records))
        return Micro(loss, [loss.item()], router)

    def evaluate(self, model: torch.nn.Module, records: Any, batches: list[list[int]]) -> dict[str, float]:
        """val_loss: the token-weighted mean over the held-out set; a -1 of `batches` (padding, so every
        rank runs as many passes) is a record without targets."""
        blank = dict(records[0], labels=[IGNORE_INDEX] * len(records[0]["labels"]))
        loss_total, n_targets = 0.0, 0
        for mb in batches:
            recs = [records[i] if i >= 0 else blank for i in mb]
            loss, _ = self.loss_sum(model, self.collate(recs))
            loss_total += loss.item()
            n_targets += batching.count_targets(recs)
        distributed.reshard(model)
        loss_total, n_targets = distributed.all_reduce_sum([loss_total, n_targets], self.device)
        return means(self.metrics, [loss_total], n_targets, "val_")

    def collate(self, records: list[dict]) -> dict[str, torch.Tensor]:
        return batching.collate(records, self.pad_token_id, self.cfg.packing)
