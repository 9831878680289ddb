"""Records and batches: packing samples into sequences, padding them into tensors, and the batch plan.

- Packing: samples are concatenated into sequences of at most `max_seq_length` tokens, each with its own
  position ids (0, 1, ... per sample); transformers turns restarting position ids into a block-diagonal mask.
- Batch plan: the samples of optimizer step k are a pure function of (seed, k), whatever the world size;
  each rank takes its contiguous slice and splits it into micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pkg.trainer.config import grad_accumulation
from pkg.trainer.errors import TrainerError
from pkg.trainer.loss import IGNORE_INDEX


def pack(samples: list[tuple[list[int], list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy next-fit in order: append each sample to the current sequence, or start a new one when it
    would pass max_len tokens (earlier sequences are not revisited)."""
    packed: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "seq_lens": []}
    for ids, labels in samples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_len:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "seq_lens": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["seq_lens"].append(len(ids))
    if cur["input_ids"]:
        packed.append(cur)
    return packed


def to_records(samples, packing: bool, max_len: int) -> list[dict[str, list[int]]]:
    """The samples as records (input_ids, labels, seq_lens): packed, or one sample each."""
    if packing:
        return pack(samples, max_len)
    return [{"input_ids": ids, "labels": labels, "seq_lens": [len(ids)]} for ids, labels in samples]


def collate(records: list[dict[str, list[int]]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest record; packed batches also carry per-sample position ids.

    Unpacked batches need no attention mask: under causal attention a real token only sees earlier
    positions, which are all real when the padding is on the right, and padded positions are never
    targets. Without a mask (or position ids) the model runs plain causal attention, the fastest kind.
    """
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)
    for row, r in enumerate(records):
        n = len(r["input_ids"])
        ids[row, :n] = torch.tensor(r["input_ids"])
        labels[row, :n] = torch.tensor(r["labels"])
    batch = {"input_ids": ids, "labels": labels}
    if packing:
        positions = torch.zeros((len(records), width), dtype=torch.long)
        for row, r in enumerate(records):
            n = len(r["input_ids"])
            positions[row, :n] = torch.cat([torch.arange(k) for k in r["seq_lens"]])
            positions[row, n:] = torch.arange(width - n)  # padding is its own segment
        batch["position_ids"] = positions
    return batch


def count_targets(records: list[dict[str, list[int]]]) -> int:
    """Tokens that count in the loss (shifted: the label of position 0 is never used)."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in records)


def most_targets(records, micro_batch_size: int) -> int:
    """The most target tokens a micro-batch of these records can hold: the sum of the micro_batch_size
    largest per-record counts (what sizes the loss's block of logits); 0 when the records have no labels
    (preference pairs). `records`: a list of records, or a TokenizedSplit, counted column-wise in blocks
    (a million records in well under a second, without a Python loop over tokens)."""
    columns = getattr(records, "columns", None)
    if columns is None:
        if not records or "labels" not in records[0]:
            return 0
        counts = torch.tensor([count_targets([r]) for r in records])
    elif "labels" not in columns:
        return 0
    else:
        labels, offsets = columns["labels"], columns["labels.offsets"]
        counts = torch.zeros(len(offsets) - 1, dtype=torch.int64)
        first, block = 0, 1 << 24  # tokens per block: bounded temporaries whatever the dataset's size
        while first < len(counts):
            last = max(first + 1, int(torch.searchsorted(offsets, offsets[first] + block)) - 1)
            last = min(last, len(counts))
            base = int(offsets[first])
            starts, ends = offsets[first:last] - base, offsets[first + 1 : last + 1] - base
            kept = (labels[base : base + int(ends[-1])] != IGNORE_INDEX).to(torch.int64)
            kept[starts[starts < len(kept)]] = 0  # a record's first label is never used (count_targets)
            running = torch.cat([kept.new_zeros(1), kept.cumsum(0)])
            counts[first:last] = running[ends] - running[starts]
            first = last
    return int(counts.topk(min(micro_batch_size, len(counts))).values.sum())


@dataclass(frozen=True)
class BatchPlan:
    """Which records each rank uses at each optimizer step: a pure function of (seed, step)."""

    num_records: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int
    # Optimizer steps of an epoch at most (torchtune's max_steps_per_epoch); 0: every full global batch.
    max_steps_per_epoch: int = 0
    # Token count of each record. When given, each rank's micro-batches group records of similar length,
    # which pads less; the loss is a sum over the whole global batch, so the result does not change.
    lengths: Sequence[int] | None = field(default=None, repr=False, compare=False)
    shuffle: bool = True  # False: every epoch in file order (torchtune's shuffle: False)

    def __post_init__(self) -> None:
        per_rank, rest = divmod(self.global_batch_size, self.micro_batch_size * self.world_size)
        if rest or not per_rank:
            raise TrainerError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x world size ({self.world_size}) = "
                f"{self.micro_batch_size * self.world_size}"
            )
        if self.steps_per_epoch == 0:
            raise TrainerError(
                f"only {self.num_records} training sequences, fewer than global_batch_size "
                f"({self.global_batch_size}): lower global_batch_size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        full = self.num_records // self.global_batch_size
        return min(full, self.max_steps_per_epoch) if self.max_steps_per_epoch else full

    @property
    def grad_accum(self) -> int:
        return grad_accumulation(self.global_batch_size, self.micro_batch_size, self.world_size)

    def global_batch(self, step: int) -> list[int]:
        """Record indices of optimizer step `step` (0-based), identical on every rank and world size."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self.shuffle:
            order = torch.randperm(
                self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
        else:
            order = torch.arange(self.num_records)
        return order[i * self.global_batch_size : (i + 1) * self.global_batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's contiguous slice of the global batch in micro-batches (shortest first if `lengths`)."""
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        if self.lengths is not None:
            mine.sort(key=self.lengths.__getitem__)
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]

    def val_batches(self, num_val: int) -> list[list[int]]:
        """This rank's share of the validation records; -1 pads so all ranks run the same number of passes."""
        stride = self.micro_batch_size * self.world_size
        padded = list(range(num_val)) + [-1] * (-num_val % stride)
        return [
            padded[i + self.rank * self.micro_batch_size : i + (self.rank + 1) * self.micro_batch_size]
            for i in range(0, len(padded), stride)
        ]
