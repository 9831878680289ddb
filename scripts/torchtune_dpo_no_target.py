"""What torchtune 0.6.1 makes of a DPO pair with no target token (its prompt fills tokenizer.max_seq_len),
which the trainer matches (docs/trainer.md, preference fine-tuning):

    /work/venvs/torchtune/bin/python scripts/torchtune_dpo_no_target.py

Runs in the side venv (the trainer never imports torchtune): the recipes' own get_batch_log_probs and DPOLoss
on random logits, a batch of two pairs whose second has every label ignored. Prints its log-probabilities
(0: a masked sum over no token), its loss (ln 2, with or without label smoothing), its rewards (0) and
accuracy (0), and that the recipe's loss.mean() includes it.
"""

from __future__ import annotations

import math

import torch
from torchtune.rlhf import get_batch_log_probs
from torchtune.rlhf.loss import DPOLoss

torch.manual_seed(0)
logits = torch.randn(4, 6, 11)  # rows: chosen 0, chosen 1, rejected 0, rejected 1 (concatenated_forward)
labels = torch.randint(0, 11, (4, 6))
labels[:, :3] = -100  # the prompt
labels[[1, 3]] = -100  # pair 1: no target token
policy, reference = get_batch_log_probs(logits, labels), get_batch_log_probs(logits * 0.9, labels)
print("policy log-probs (chosen 0, chosen 1, rejected 0, rejected 1):", policy.tolist())
for smoothing in (0.0, 0.2):
    losses, chosen, rejected = DPOLoss(beta=0.1, label_smoothing=smoothing)(
        *policy.chunk(2), *reference.chunk(2)
    )
    print(
        f"label_smoothing {smoothing}: losses {losses.tolist()} (ln 2 = {math.log(2)}), loss.mean() "
        f"{losses.mean().item()}, rewards {chosen.tolist()} {rejected.tolist()}, "
        f"accuracies {(chosen > rejected).float().tolist()}"
    )
