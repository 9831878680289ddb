"""Log-probabilities of the target tokens, computed in chunks so the full logits never exist.

With a 150k vocabulary the output head's fp32 logits, their softmax and its gradient dominate memory
(micro batch 4 x 2048 tokens x 152k x 4 bytes is 5 GB per copy). Here the decoder runs once, the hidden
states of the (row, position) pairs whose next token is a target are gathered, and the output head and
the softmax run over them `chunk_size` tokens at a time. When there are several chunks each is
checkpointed: its logits are freed after the forward and recomputed in the backward, so at most one chunk
of logits (and its gradient) is alive at once. Prompt and padding positions cost no head at all.

    lp = token_logprobs(model, batch, chunk_size=1024)   # TokenLogprobs: one entry per target token
    loss = -lp.logprobs.sum()                             # SFT: summed cross-entropy (chunked_loss_sum)
    seq = lp.per_sequence(batch["input_ids"].size(0))    # summed log-probability of each row
    lp = token_logprobs(model, inputs, 1024, where=(rows, positions, tokens))  # explicit targets (DPO)

The head is called as a module (`model.get_output_embeddings()`), so peft's LoRA on it and a tied input
embedding work unchanged. Under FSDP2 the head lives in the root unit, whose parameters stay unsharded
from the root's forward until the end of the backward: the chunk calls (and their recomputation in the
backward) see the full weight, and the root's post-backward reduce-scatters their gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pkg.trainer.errors import TrainerError

IGNORE_INDEX = -100  # labels of positions that are not targets (data.IGNORE_INDEX)


@dataclass(frozen=True)
class TokenLogprobs:
    """log p(target) of every target token of a batch, in row-major order, with the row of each."""

    logprobs: torch.Tensor  # [N] fp32
    rows: torch.Tensor  # [N] long: the batch row each target token belongs to
    aux_loss: torch.Tensor | None = None  # an MoE router's load-balancing loss, when the forward returned one

    def per_sequence(self, batch_size: int) -> torch.Tensor:
        """[batch_size] summed log-probability of each row's target tokens (0 for a row without any)."""
        out = self.logprobs.new_zeros(batch_size)
        return out.index_add(0, self.rows, self.logprobs)


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to the head's output before returning logits (in fp32 here).

    Gemma 2/3 soft-cap (`final_logit_softcapping`), Cohere multiplies by `logit_scale`, Granite divides by
    `logits_scaling`. `check_head` verifies once per run that nothing else is applied.
    """
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _chunk_logprobs(head: nn.Module, transform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = transform(head(hidden).float())
    return -F.cross_entropy(logits, targets, reduction="none")


def final_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor], **forward_kwargs):
    """[B, T, H]: the decoder's output (what the head reads), through the model's own forward.

    The root forward runs (FSDP2's root unit unshards the head there) with no logits kept; a hook on the
    decoder captures its last hidden state. The (empty) logits are tied into the result with a zero
    weight, so a gradient reaches the root's output and FSDP2 runs the root's pre-backward hook as it
    does for a model's own logits. Returns (hidden states, the model's output without logits).
    """
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(grab)
    try:
        none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
        output = model(**batch, use_cache=False, logits_to_keep=none, **forward_kwargs)
    finally:
        handle.remove()
    return captured[-1] + output.logits.sum().to(captured[-1].dtype) * 0, output


def token_logprobs(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_size: int,
    where: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    **forward_kwargs,
) -> TokenLogprobs:
    """log p of each target token of `batch` (input_ids, labels, optional position_ids), chunk by chunk.

    `labels` hold IGNORE_INDEX where a position is not a target; the label of position t+1 is
    predicted from position t. Differentiable: gradients reach the decoder and the head (and their LoRA).
    `where`: instead of labels, the targets as [N] tensors (row, predicting position, target token), for
    layouts where a token is not predicted from the position before it (DPO's shared prompt,
    preference.collate_pairs); `batch` then holds only the model's inputs.
    `forward_kwargs` go to the model's forward (e.g. `output_router_logits=True` for an MoE's aux loss).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if where is None:
        targets = batch["labels"][:, 1:]
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        wanted = targets[rows, cols]
    else:
        rows, cols, wanted = where
    states, output = final_hidden_states(model, inputs, **forward_kwargs)
    hidden = states[rows, cols]  # [N, H]: the predicting positions
    head = model.get_output_embeddings()
    transform = logit_transform(model.config)
    # One chunk peaks at the same memory with or without recomputation (its logits, their softmax and the
    # gradient at the start of the backward), so only several chunks pay for recomputing the head.
    recompute = torch.is_grad_enabled() and hidden.size(0) > chunk_size
    chunks = []
    for start in range(0, hidden.size(0), chunk_size):
        args = (head, transform, hidden[start : start + chunk_size], wanted[start : start + chunk_size])
        if recompute:
            chunks.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(*args))
    logprobs = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0
    return TokenLogprobs(logprobs, rows, getattr(output, "aux_loss", None))


def chunked_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy of the target tokens of one micro-batch (divide by the global count)."""
    return -token_logprobs(model, batch, chunk_size).logprobs.sum()


@torch.no_grad()
def check_head(model: nn.Module, device: torch.device) -> None:
    """Refuse a model whose forward changes the head's output in a way `logit_transform` does not know.

    One forward of a 4-token row: the model's own logits of the last position against the chunked path's.
    Every rank must call it (a forward under FSDP is collective).
    """
    ids = torch.arange(4, device=device).unsqueeze(0) % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
        hidden = final_hidden_states(model, {"input_ids": ids})[0][0, -1:]
        ours = logit_transform(model.config)(model.get_output_embeddings()(hidden).float())[0]
    finally:
        model.train(was_training)
        if hasattr(model, "reshard"):  # FSDP2's root stays gathered after a forward without a backward
            model.reshard()
    # Same ops on the same inputs: equal up to fp32 rounding, or bf16 rounding of the head's output
    # (the model may transform in bf16 where we transform in fp32). A missed transform is off by far more.
    tol = 1e-4 if hidden.dtype == torch.float32 else 5e-2
    error = (reference - ours).abs().max().item() / max(reference.abs().max().item(), 1.0)
    if not error <= tol:
        raise TrainerError(
            f"{type(model).__name__}: its forward changes the output head's logits in a way the chunked "
            f"loss does not reproduce (relative difference {error:.3g}); this architecture is not supported"
        )
