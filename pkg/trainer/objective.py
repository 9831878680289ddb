"""The training objective's interface: what SFT (sft.py) and DPO (dpo.py) each bring to the recipe.

The recipe owns the loop: which records each rank trains on, the normalisation over the global batch, the
backward, gradient reduction and clipping, the optimizer step, logging and checkpoints. An objective owns
what the loss is:

    build_splits(cfg, tokenizer, cache_dir)   its tokenized data: {"train": records, "val": records}
    create(setup)                             itself, once the model is built: DPO on full fine-tuning
                                              computes its reference log-probs here, before any update
    metrics                                   the names of the sums micro_loss returns, "loss" first; train
                                              and validation report their means (metrics.jsonl, trackers)
    count(records)                            per micro-batch: (what the loss is a mean over, target tokens
                                              or pairs; the tokens the model reads, for tokens/s)
    micro_loss(model, records, indices)       one training micro-batch: Micro (summed loss, metric sums,
                                              the MoE router loss or None)
    evaluate(model, records, batches)         the held-out set's metric means, prefixed val_ (collective)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from pkg.trainer.batching import BatchPlan
    from pkg.trainer.config import TrainConfig
    from pkg.trainer.distributed import DistInfo


class Micro(NamedTuple):
    """One micro-batch's share of a training step."""

    loss: torch.Tensor  # summed over the micro-batch; the recipe divides by the global batch's count
    sums: list[float]  # one per `metrics` of the objective, summed over the micro-batch
    router_loss: torch.Tensor | None  # an MoE model's load-balancing loss (a mean), None when not added


@dataclass(frozen=True)
class Setup:
    """What an objective may use from the recipe's setup to create itself."""

    cfg: TrainConfig
    dist: DistInfo
    model: torch.nn.Module  # the policy, built and sharded, before any update
    router_loss: bool  # an MoE model whose router load-balancing loss trains with it (model.router_aux_coef)
    pad_token_id: int
    plan: BatchPlan
    train_data: Any  # the tokenized records (data_cache.read_cache)
    val_data: Any
    out: Path
    build_model: Callable[[str], torch.nn.Module]  # another model_dir, built as the policy was


class Objective(Protocol):
    metrics: tuple[str, ...]

    @staticmethod
    def build_splits(cfg: TrainConfig, tokenizer, cache_dir: str) -> dict[str, list[dict]]: ...

    @classmethod
    def create(cls, setup: Setup) -> Objective: ...

    def count(self, records: list[dict]) -> tuple[int, int]: ...

    def micro_loss(self, model: torch.nn.Module, records: list[dict], indices: list[int]) -> Micro: ...

    def evaluate(
        self, model: torch.nn.Module, records: Any, batches: list[list[int]]
    ) -> dict[str, float]: ...


def means(names: Sequence[str], sums: Sequence[float], count: float, prefix: str = "") -> dict[str, float]:
    """{prefix + name: sum / count}: the metrics of a step (count over the global batch) or a validation;
    NaN over a count of 0 (a batch or held-out set without a target token: no mean to report)."""
    return {
        prefix + name: value / count if count else math.nan for name, value in zip(names, sums, strict=True)
    }
