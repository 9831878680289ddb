"""What torchtune 0.6.1 makes of SFT rows with no target token (the prompt fills tokenizer.max_seq_len with
train_on_input false), which the trainer follows where it is defined (docs/trainer.md, Data):

    /work/venvs/torchtune/bin/python scripts/torchtune_sft_no_target.py

Runs in the side venv (the trainer never imports torchtune). SFTDataset keeps such a row (its labels are all
CROSS_ENTROPY_IGNORE_IDX) and padded_collate_sft batches it like any other. The recipes' loss on a micro-batch
is CEWithChunkedOutputLoss(logits, labels) * (its target tokens), summed over the step's micro-batches and
divided by their target tokens: a row without a target adds 0 to both. A micro-batch without any target is
0 / 0 in CEWithChunkedOutputLoss: its loss is NaN, so the step's logged loss is NaN, but its gradients are 0
(cross-entropy's backward writes nothing for an ignored label, whatever flows in), so the update is the other
micro-batches' token mean. A step without any target scales its (zero) gradients by world_size / 0 = inf:
NaN gradients, which the optimizer applies to every weight.
"""

from __future__ import annotations

import torch
from torchtune.data import padded_collate_sft
from torchtune.modules.loss import CEWithChunkedOutputLoss

IGNORE = -100
torch.manual_seed(0)
rows = [
    {"tokens": [1, 5, 6, 7, 8, 2], "labels": [IGNORE, IGNORE, IGNORE, 7, 8, 2]},
    {"tokens": [1, 9, 9, 9], "labels": [IGNORE] * 4},  # the prompt fills max_seq_len: no target
]
batch = padded_collate_sft(rows, padding_idx=0, ignore_idx=IGNORE)
print("collated labels:", batch["labels"].tolist())
head = torch.nn.Linear(8, 11, bias=False)
hidden = torch.randn(2, 6, 8)


def recipe_loss(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """full_finetune_*'s step over one micro-batch: (loss * num_tokens, num_tokens); labels shifted."""
    head.zero_grad()
    num_tokens = (labels != IGNORE).sum()
    shifted = torch.hstack((labels[..., 1:], torch.full((labels.size(0), 1), IGNORE)))
    logits = [head(chunk) for chunk in hidden[: labels.size(0)].chunk(2, dim=1)]
    loss = CEWithChunkedOutputLoss(num_output_chunks=2)(logits, shifted) * num_tokens
    loss.backward()
    return loss, num_tokens


both, n_both = recipe_loss(batch["labels"])
alone, n_alone = recipe_loss(batch["labels"][:1])
print(f"with the no-target row: {both.item() / n_both.item():.6f} over {n_both.item()} tokens")
print(f"first row alone:        {alone.item() / n_alone.item():.6f} over {n_alone.item()} tokens")
empty, n_empty = recipe_loss(batch["labels"][1:])
print(
    f"a micro-batch of the no-target row only: loss {empty.item()} over {n_empty.item()} tokens, "
    f"head gradient all zero: {bool((head.weight.grad == 0).all())}"
)
head.weight.grad *= 1 / n_empty  # training.scale_grads(model, world_size / num_tokens) of a step like it
print(f"a step of it alone, after scale_grads: head gradient NaN: {bool(head.weight.grad.isnan().all())}")
