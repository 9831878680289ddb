"""Log-probabilities of the target tokens, computed in chunks so the full logits never exist.

With a 150k vocabulary the output head's fp32 logits, their softmax and its gradient dominate memory
(micro batch 4 x 2048 tokens x 152k x 4 bytes is 5 GB per copy). Here the decoder runs once, the hidden
states of the (row, position) pairs whose next token is a target are gathered, and the output head and
the softmax run over them `chunk_size` tokens at a time. Prompt and padding positions cost no head at all.

    lp = token_logprobs(model, batch, chunk_size=1024)   # TokenLogprobs: one entry per target token
    loss = -lp.logprobs.sum()                             # SFT: summed cross-entropy (chunked_loss_sum)
    seq = lp.per_sequence(batch["input_ids"].size(0))    # summed log-probability of each row
    lp = token_logprobs(model, inputs, 1024, where=(rows, positions, tokens))  # explicit targets (DPO)

Two ways through the head:
- fused (`_HeadLogprobs`), for a plain linear head or a vocabulary-sharded one (vocab_parallel.py): the
  head's matrix product and the log-softmax in one autograd function that keeps one chunk of fp32 logits
  alive at a time and, in the backward, recomputes it and turns it into its gradient in place.
- any other head (LoRA on it, an FSDP unit) is called as a module, each chunk checkpointed when there are
  several, so its logits are recomputed in the backward. Under FSDP2 a head unit is gathered for each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pkg.trainer import vocab_parallel
from pkg.trainer.errors import TrainerError

IGNORE_INDEX = -100  # the label of a position that is not a target (the data modules write it, loss skips it)


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


@dataclass(frozen=True)
class LogitTransform:
    """What the model's forward does to the head's output before returning logits (in fp32 here).

    Cohere multiplies by `logit_scale` and Granite divides by `logits_scaling` (together: `factor`), Gemma
    2/3 soft-cap (`final_logit_softcapping`). `check_head` verifies once per run that nothing else is applied.
    """

    factor: float = 1.0
    cap: float | None = None

    @staticmethod
    def of(config) -> LogitTransform:
        scale = getattr(config, "logit_scale", None) or 1.0
        divide = getattr(config, "logits_scaling", None) or 1.0
        return LogitTransform(scale / divide, getattr(config, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.factor != 1.0:
            logits = logits * self.factor
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """The same, in place on fp32 logits of the fused head's own making."""
        if self.factor != 1.0:
            logits.mul_(self.factor)
        if self.cap is not None:
            logits.div_(self.cap).tanh_().mul_(self.cap)
        return logits

    def slope(self, transformed: torch.Tensor) -> torch.Tensor | float:
        """d(transformed)/d(logits), from the transformed values: a tensor when soft-capped, else `factor`."""
        if self.cap is None:
            return self.factor
        return (transformed / self.cap).square_().neg_().add_(1).mul_(self.factor)


def _chunk_logprobs(head: nn.Module, transform, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = transform(head(hidden).float())
    return -F.cross_entropy(logits, targets, reduction="none")


def _pick(logits: torch.Tensor, local_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose target this vocabulary slice holds, those targets' columns)."""
    here = (local_targets >= 0) & (local_targets < logits.size(1))
    rows = here.nonzero(as_tuple=True)[0]
    return rows, local_targets[rows]


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) through a linear head, `chunk` tokens at a time: one [chunk, rows] block of fp32 logits
    is alive at once, in the forward and in the backward (which recomputes it and turns it into its own
    gradient in place), against ~4 blocks for autograd's softmax. With a VocabShard the head holds this
    rank's vocabulary rows and every rank's target tokens go through them (vocab_parallel.py)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform: LogitTransform, chunk: int, shard):
        n = hidden.size(0)
        m = n
        if shard is not None:
            (hidden, targets), m = vocab_parallel.gather_rows([hidden, targets], shard.group)
            chunk *= dist.get_world_size(shard.group)  # the same memory: each rank holds 1/world of a row
        start = shard.start if shard is not None else 0
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        lse = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        picked = torch.zeros_like(lse)
        for s in range(0, hidden.size(0), chunk):
            logits = transform.apply_(F.linear(hidden[s : s + chunk], w, b).float())
            rows, cols = _pick(logits, targets[s : s + chunk] - start)
            picked[s + rows] = logits[rows, cols]
            top = logits.max(1).values if logits.size(1) else torch.full_like(lse[s : s + chunk], -math.inf)
            if shard is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=shard.group)
            lse[s : s + chunk] = logits.sub_(top[:, None]).exp_().sum(1)
            if shard is not None:  # sums of exponentials; the target's logit from the rank that holds it
                both = torch.stack([lse[s : s + chunk], picked[s : s + chunk]])
                dist.all_reduce(both, group=shard.group)
                lse[s : s + chunk], picked[s : s + chunk] = both
            lse[s : s + chunk] = lse[s : s + chunk].log_().add_(top)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.transform, ctx.chunk, ctx.shard, ctx.n, ctx.m = transform, chunk, shard, n, m
        out = picked.sub_(lse)
        return out if shard is None else vocab_parallel.own_rows(out, m, n, shard.group)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        transform, chunk, shard = ctx.transform, ctx.chunk, ctx.shard
        if shard is not None:
            (grad,), _ = vocab_parallel.gather_rows([grad], shard.group)
        start = shard.start if shard is not None else 0
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        # fp32 until the ranks' contributions are summed, then the hidden states' dtype (bf16 under MP)
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if want_h or shard is not None else None
        grad_weight = torch.zeros_like(weight) if want_w else None
        grad_bias = torch.zeros_like(bias) if want_b else None
        for s in range(0, hidden.size(0), chunk):
            h = hidden[s : s + chunk]
            logits = transform.apply_(F.linear(h, w, b).float())
            slope = transform.slope(logits)
            d = logits.sub_(lse[s : s + chunk, None]).exp_()  # softmax over the whole vocabulary
            rows, cols = _pick(d, targets[s : s + chunk] - start)
            d[rows, cols] -= 1  # d(-log p)/d(logit) = softmax - one-hot
            d.mul_(grad[s : s + chunk, None].neg()).mul_(slope)
            if grad_bias is not None:
                grad_bias += d.sum(0).to(grad_bias.dtype)
            d = d.to(w.dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = (d @ w).float()
            if grad_weight is not None and d.dtype == grad_weight.dtype == h.dtype:
                grad_weight.addmm_(d.t(), h)  # in place: no temporary of the head's size (fp32: 311 MB at
                # a vocabulary of 151,936 x 512), which set full fine-tuning's peak
            elif grad_weight is not None:
                grad_weight += (d.t() @ h).to(grad_weight.dtype)
        if shard is not None:  # each rank's slice of the vocabulary contributed to every rank's tokens
            grad_hidden = vocab_parallel.scatter_sum(grad_hidden, ctx.m, ctx.n, shard.group)
            for g in (grad_weight, grad_bias):  # summed over every rank's tokens: FSDP's mean is wanted
                if g is not None:
                    g /= dist.get_world_size(shard.group)
        grad_hidden = grad_hidden.to(hidden.dtype) if want_h else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _fused_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, object] | None:
    """(weight, bias, shard) of a head the fused path can take: plain or vocabulary-sharded, no LoRA."""
    if isinstance(head, vocab_parallel.VocabParallelHead):
        return (*head.local_weights(), head.shard)
    if type(head) is nn.Linear:  # not an FSDP unit (it would need its hooks) nor a peft layer
        return head.weight, head.bias, None
    return None


def final_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor], **forward_kwargs):
    """[B, T, H]: the decoder's output (what the head reads), through the model's own forward.

    The root forward runs with no logits kept; a hook on the decoder captures its last hidden state. The
    (empty) logits are tied into the result with a zero weight, so a gradient reaches the root's output and
    FSDP2 runs the root's pre-backward hook as it does for a model's own logits. A plain linear head's empty
    logits reach the graph through its input only: through its weight their backward would be a zero
    gradient of the head's whole size ([vocab, 0] @ [0, hidden]: 311 MB at 151,936 x 512 in fp32), added
    to the fused loss's own, which set full fine-tuning's peak. Returns (hidden states, the model's output
    without logits).
    """
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    def input_only(_module, args, output):
        return output.detach() + args[0].sum().to(output.dtype) * 0 if args else output

    handles = [model.get_decoder().register_forward_hook(grab)]
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:  # VocabParallelHead does the same itself; others (LoRA, FSDP units) as is
        handles.append(head.register_forward_hook(input_only))
    try:
        none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
        output = model(**batch, use_cache=False, logits_to_keep=none, **forward_kwargs)
    finally:
        for handle in handles:
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
    transform = LogitTransform.of(model.config)
    fused = _fused_head(head)
    if fused is not None:
        weight, bias, shard = fused
        logprobs = _HeadLogprobs.apply(hidden, weight, bias, wanted, transform, chunk_size, shard)
        return TokenLogprobs(logprobs, rows, getattr(output, "aux_loss", None))
    # Any other head (LoRA on it, an FSDP unit): called as a module per chunk, each chunk checkpointed.
    # One chunk peaks at the same memory with or without recomputation (its logits, their softmax and the
    # gradient at the start of the backward), so only several chunks pay for recomputing the head.
    n_chunks = _chunks_on_every_rank(math.ceil(hidden.size(0) / chunk_size), hidden.device)
    recompute = torch.is_grad_enabled() and n_chunks > 1
    chunks = []
    for start in range(0, n_chunks * chunk_size, chunk_size):  # past this rank's tokens: empty chunks
        args = (head, transform, hidden[start : start + chunk_size], wanted[start : start + chunk_size])
        if recompute:
            chunks.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(*args))
    logprobs = torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0
    return TokenLogprobs(logprobs, rows, getattr(output, "aux_loss", None))


def _chunks_on_every_rank(n_chunks: int, device: torch.device) -> int:
    """The most chunks any rank has; collective at world size > 1.

    Every call of a head module may be collective (an FSDP unit gathers its weights for each call, and
    recomputes it in the backward), and a trained head's gradients are reduced over the ranks only if each
    rank has one (FSDP's reduce-scatter, QLoRA's all-reduce). So every rank calls it as often as the rank
    with the most target tokens, with empty chunks past its own (zero gradients), and takes the same
    recompute decision, whatever its own count: a rank whose micro-batch is all padding included.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n_chunks
    count = torch.tensor([n_chunks], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def chunked_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Summed cross-entropy of the target tokens of one micro-batch (divide by the global count)."""
    return -token_logprobs(model, batch, chunk_size).logprobs.sum()


@torch.no_grad()
def check_head(model: nn.Module, device: torch.device) -> None:
    """Refuse a model whose forward changes the head's output in a way `LogitTransform` does not know.

    One forward of a 4-token row: the model's own logits of the last position against the chunked path's.
    Every rank must call it (a forward under FSDP is collective).
    """
    ids = torch.arange(4, device=device).unsqueeze(0) % model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
        hidden = final_hidden_states(model, {"input_ids": ids})[0][0, -1:]
        ours = LogitTransform.of(model.config)(model.get_output_embeddings()(hidden).float())[0]
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
