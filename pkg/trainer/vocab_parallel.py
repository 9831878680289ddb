"""The input embedding and the output head split by vocabulary rows across the ranks, never gathered.

With a 150k vocabulary these two matrices are most of a small model's weights (151,936 x 896 twice in
Qwen2.5-0.5B) and as FSDP2 units each is gathered whole on every rank, with a whole-size gradient, while it
runs. Here rank r keeps rows [r*c, (r+1)*c) of each (c = ceil(vocab / world), torch.chunk's split) as a
DTensor shard (Shard(0) on the FSDP mesh, outside FSDP's units, so the optimizer, gradient clipping,
checkpoints and the export treat it as one more sharded parameter), and activations move instead:

- embedding: the ranks' token ids are all-gathered, each rank looks up the tokens its rows hold (zero rows
  for the others) and a reduce-scatter sums each rank's tokens back to it. Backward: the output gradients
  are all-gathered and each rank adds those of its own tokens into its rows.
- head: loss.py's fused head (`_HeadLogprobs`) all-gathers the hidden states of the ranks' target tokens,
  each rank computes the logits of its vocabulary slice, and the log-sum-exp and each target's logit are
  all-reduced; its backward reduce-scatters the hidden-state gradients back to their ranks.

Per micro-batch a rank then exchanges about 4 x world x tokens x hidden values, where FSDP gathers the two
matrices in the forward and again in the backward and reduce-scatters their gradients (~8 x vocabulary x
hidden): `wanted` turns this on where it moves less. Every logit is still computed once, by the rank that
holds its row. Only plain modules are converted (nn.Embedding, Gemma 3's scaled one, nn.Linear); a head
with LoRA stays an FSDP unit.

Under hybrid sharding (distributed.Layout) the split runs over the shard group (a node) only: its
collectives stay on the node, each node holds a whole copy of the two matrices split over its ranks
(placements Replicate() on the mesh's replicate dimension, Shard(0) on its shard dimension), and
`reduce_replicas` averages their gradients across the nodes once per step, as FSDP does for its units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + rows) of a vocabulary of `vocab` split over `group` in blocks of
    `per_rank` rows (the last ranks may hold fewer)."""

    group: dist.ProcessGroup
    start: int
    rows: int
    vocab: int
    per_rank: int

    @staticmethod
    def of(vocab: int, group: dist.ProcessGroup) -> VocabShard:
        per_rank = math.ceil(vocab / dist.get_world_size(group))  # torch.chunk's split, as DTensor's Shard(0)
        start = min(dist.get_rank(group) * per_rank, vocab)
        return VocabShard(group, start, min(per_rank, vocab - start), vocab, per_rank)


def wanted(setting: str, world_size: int, tokens_per_rank: int, vocab: int) -> bool:
    """`vocab_parallel`: always, never, or auto = when the exchanged activations (world x tokens) are below
    twice the vocabulary, i.e. when they move fewer bytes than gathering the two matrices would. (A single
    process is sharded only for bf16 mixed precision; split, its head takes loss.py's fused path.)"""
    if setting == "never":
        return False
    return setting == "always" or world_size * tokens_per_rank <= 2 * vocab


# ---------------------------------------------------------------- collectives on rows


def gather_rows(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> tuple[list[torch.Tensor], int]:
    """Every rank's rows of each tensor, padded with zeros to the longest rank's count m and stacked rank
    after rank ([world * m, ...] each), and m. Every rank must call it with the same number of tensors."""
    count = torch.tensor([tensors[0].size(0)], device=tensors[0].device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    m, world = int(count), dist.get_world_size(group)
    out = []
    for t in tensors:
        padded = t.new_zeros((m, *t.shape[1:]))
        padded[: t.size(0)] = t
        gathered = t.new_empty((world * m, *t.shape[1:]))
        if m:
            dist.all_gather_into_tensor(gathered, padded, group=group)
        out.append(gathered)
    return out, m


def scatter_sum(rows: torch.Tensor, m: int, n: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse of gather_rows for gradients: `rows` ([world * m, ...]) summed over the ranks, this rank
    keeping its own first n rows."""
    out = rows.new_empty((m, *rows.shape[1:]))
    if m:
        dist.reduce_scatter_tensor(out, rows.contiguous(), group=group)
    return out[:n]


def own_rows(rows: torch.Tensor, m: int, n: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's first n of its m rows in a gather_rows layout (no communication)."""
    start = dist.get_rank(group) * m
    return rows[start : start + n]


# ---------------------------------------------------------------- embedding


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, shard: VocabShard, padding_idx: int | None, dtype: torch.dtype):
        flat = ids.reshape(-1)
        (every,), m = gather_rows([flat], shard.group)
        local = every - shard.start
        here = (local >= 0) & (local < shard.rows)
        rows = weight.new_zeros((every.size(0), weight.size(1)), dtype=dtype)
        rows[here] = weight[local[here]].to(dtype)
        mine = scatter_sum(rows, m, flat.numel(), shard.group)  # one rank holds each row: the sum is exact
        if padding_idx is not None:  # nn.Embedding leaves the padding row's gradient at zero
            here &= every != padding_idx
        ctx.save_for_backward(local, here)
        ctx.shard, ctx.shape = shard, weight.shape
        return mine.view(*ids.shape, weight.size(1))

    @staticmethod
    def backward(ctx, grad):
        local, here = ctx.saved_tensors
        (every,), _ = gather_rows([grad.reshape(-1, grad.size(-1))], ctx.shard.group)
        weight_grad = every.new_zeros(ctx.shape, dtype=torch.float32)
        weight_grad.index_add_(0, local[here], every[here].float())
        # That sums every rank's tokens; FSDP's gradients are means over the ranks (each rank's own batch).
        return weight_grad / dist.get_world_size(ctx.shard.group), None, None, None, None


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding (or Gemma 3's scaled one) whose `weight` is a Shard(0) DTensor of vocabulary rows."""

    def __init__(self, original: nn.Embedding, weight: nn.Parameter, shard: VocabShard, dtype: torch.dtype):
        super().__init__()
        self.weight, self.shard, self.dtype = weight, shard, dtype
        self.num_embeddings, self.embedding_dim = original.num_embeddings, original.embedding_dim
        self.padding_idx = original.padding_idx
        if hasattr(original, "embed_scale"):  # Gemma 3: multiplied after the lookup, a non-persistent buffer
            self.register_buffer("embed_scale", original.embed_scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = _Lookup.apply(self.weight.to_local(), ids, self.shard, self.padding_idx, self.dtype)
        scale = getattr(self, "embed_scale", None)
        return out if scale is None else out * scale.to(out.dtype)


# ---------------------------------------------------------------- head


class VocabParallelHead(nn.Module):
    """The output head's rows of this rank. loss.token_logprobs runs its fused head on them; called as a
    module it returns whole logits, gathered: for the handful of positions check_head looks at, without
    gradient."""

    def __init__(self, original: nn.Linear, weight: nn.Parameter, bias: nn.Parameter | None, shard) -> None:
        super().__init__()
        self.weight, self.bias, self.shard = weight, bias, shard
        self.in_features, self.out_features = original.in_features, original.out_features

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight.to_local(), None if self.bias is None else self.bias.to_local()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = (*hidden.shape[:-1], self.shard.vocab)
        if hidden.numel() == 0:  # the loss's forward asks for no logits; keep the output in the graph
            return hidden.new_zeros(shape) + hidden.sum() * 0
        if torch.is_grad_enabled() and hidden.requires_grad:
            raise RuntimeError("a vocabulary-sharded head gives whole logits without gradient only")
        weight, bias = self.local_weights()
        flat = hidden.reshape(-1, hidden.size(-1))
        (every,), m = gather_rows([flat], self.shard.group)
        per_rank = self.shard.per_rank
        logits = every.new_zeros((every.size(0), per_rank))
        bias = None if bias is None else bias.to(every.dtype)
        logits[:, : self.shard.rows] = nn.functional.linear(every, weight.to(every.dtype), bias)
        world = dist.get_world_size(self.shard.group)
        slices = logits.new_empty((world * logits.size(0), per_rank))
        dist.all_gather_into_tensor(slices, logits, group=self.shard.group)
        slices = slices.view(world, logits.size(0), per_rank).transpose(0, 1)  # [token, rank, per_rank]
        mine = own_rows(slices, m, flat.size(0), self.shard.group)
        return mine.reshape(flat.size(0), -1)[:, : self.shard.vocab].reshape(shape)


# ---------------------------------------------------------------- conversion

SPLIT = (VocabParallelEmbedding, VocabParallelHead)


def shard_group(mesh) -> dist.ProcessGroup:
    """The ranks a vocabulary is split over: the mesh's shard dimension (all of a 1-D mesh)."""
    return mesh.get_group("shard") if mesh.ndim > 1 else mesh.get_group()


def split_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's vocabulary-split modules."""
    return [p for m in model.modules() if isinstance(m, SPLIT) for p in m.parameters(recurse=False)]


@torch.no_grad()
def reduce_replica_grad(p: nn.Parameter) -> None:
    """Average a split parameter's gradient over the replicas of a hybrid mesh (no-op on a 1-D mesh): each
    replica's gradient is already the mean over its own shard group's tokens."""
    mesh = p.device_mesh
    if p.grad is None or mesh.ndim == 1:
        return
    group = mesh.get_group("replicate")
    local = p.grad.to_local()  # under no_grad: the gradient's own storage
    dist.all_reduce(local, group=group)
    local /= dist.get_world_size(group)


def reduce_replicas(model: nn.Module) -> None:
    """After the backward: what FSDP's HSDP all-reduce does for its units, for the split rows."""
    for p in split_parameters(model):
        reduce_replica_grad(p)


def _is_plain_embedding(module: nn.Module | None) -> bool:
    if not isinstance(module, nn.Embedding) or module.max_norm is not None or module.sparse:
        return False
    return type(module) is nn.Embedding or type(module).__name__.endswith("ScaledWordEmbedding")


def _shard_parameter(p: nn.Parameter, shard: VocabShard, mesh, device: torch.device) -> nn.Parameter:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    rows = p.detach()[shard.start : shard.start + shard.rows]
    local = torch.empty_like(rows, device="meta") if p.is_meta else rows.to(device).clone()
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]  # hybrid: a copy per replica, split within
    dt = DTensor.from_local(local, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
    return nn.Parameter(dt, requires_grad=p.requires_grad)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # Hooks go along: e.g. transformers' enable_input_require_grads hooks the input embedding.
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    new._forward_hooks.update(old._forward_hooks)
    for name, module in model.named_modules():
        if module is old:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)


def convert(model: nn.Module, mesh, device: torch.device, dtype: torch.dtype) -> set[nn.Parameter]:
    """Swap the model's plain input embedding and output head for vocabulary-sharded ones (same parameter
    names); returns their parameters, which FSDP must leave alone. `dtype`: what the embedding returns (the
    compute dtype, as an FSDP unit with mixed precision would)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and getattr(head, "weight", None) is embedding.weight
    use_embedding, use_head = _is_plain_embedding(embedding), type(head) is nn.Linear
    if tied and not (use_embedding and use_head):
        return set()  # one weight serves both; it cannot be sharded for one and whole for the other
    group = shard_group(mesh)
    converted: set[nn.Parameter] = set()
    if use_embedding:
        shard = VocabShard.of(embedding.num_embeddings, group)
        weight = _shard_parameter(embedding.weight, shard, mesh, device)
        _replace(model, embedding, VocabParallelEmbedding(embedding, weight, shard, dtype))
        converted.add(weight)
    if use_head:
        shard = VocabShard.of(head.out_features, group)
        weight = next(iter(converted)) if tied else _shard_parameter(head.weight, shard, mesh, device)
        bias = None if head.bias is None else _shard_parameter(head.bias, shard, mesh, device)
        _replace(model, head, VocabParallelHead(head, weight, bias, shard))
        converted.update(p for p in (weight, bias) if p is not None)
    return converted
