"""Process group and FSDP2 sharding.

Under torchrun the rank and world come from its environment (torchrun itself reads the PET_* variables a
Kubeflow TrainJob sets). `python -m pkg.trainer` runs as a group of one, so a single code path serves both.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

from pkg.trainer.errors import TrainerError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _attempt_store(timeout: datetime.timedelta) -> dict:
    """After a torchrun restart (`--max-restarts`), a store namespace of this attempt's own.

    With static rendezvous (`--master-port`, the PET_* variables of a TrainJob) the agent keeps one
    TCPStore across restarts, and the process group's keys have no attempt prefix: a restarted rank
    can read the address of a rank that died and never connect. A prefix per attempt avoids that.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    world_size = int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    client = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"pkg.trainer/attempt-{restart}", client)
    return {"store": store, "rank": int(os.environ["RANK"]), "world_size": world_size}


def init(timeout_minutes: int) -> DistInfo:
    """Join the process group (gloo on CPU, NCCL on CUDA); a group of one outside torchrun."""
    alone = {}
    if "MASTER_ADDR" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":  # not under torchrun
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        # A group of one needs no rendezvous: an in-memory store, no TCP port to race other processes for.
        alone = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
            **(alone or _attempt_store(timeout)),
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, local_world)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that ran collectives, skipping interpreter finalization (atexit handlers still run).

    `destroy_process_group` does not join gloo's worker threads: a worker drops each finished collective's
    tensors a moment after the caller was woken, and the group lives on in FSDP's device meshes. If that
    drop lands while the interpreter is finalizing, the thread cannot take the GIL, is unwound inside a
    destructor, and the whole process aborts ("terminate called without an active exception", SIGABRT)
    after a run that finished: its pod fails. Seen here about once in 40 two-rank runs.
    """
    atexit._run_exitfuncs()  # logging.shutdown and friends, while the interpreter is whole
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ---------------------------------------------------------------- decisions every rank takes together
# A rank that fails alone and raises would leave the others waiting in their next collective until the
# timeout; so a failure is shared first, and every rank raises it (or none does).


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank; collective."""
    if world_size() == 1:  # nothing to gather: no pickling through the process group
        return [obj]
    objs: list = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def agree(error: str | None, kind: type[Exception] = TrainerError) -> None:
    """Raise `kind(first error)` on every rank if any rank passes an error; collective, and a barrier."""
    error = next((e for e in all_gather(error) if e), None)
    if error:
        raise kind(error)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` holds on any rank; collective. One small all_reduce: cheap enough for
    every step (the stop signal), where `agree`'s object gather is not."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cpu")
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (a decision rank 0 took alone); collective."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (in float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found through transformers' `_no_split_modules` (works under peft too)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:  # fall back to the children of the longest ModuleList
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers


@dataclass(frozen=True)
class Layout:
    """How FSDP spreads the weights: `replicas` copies, each sharded over `group_size` ranks.

    Full sharding is one copy over every rank (group_size 0 stands for the world); hybrid (HSDP) shards
    within groups of consecutive ranks (torchrun numbers a node's processes consecutively, so a group is a
    node) and replicates across them: each layer's all-gather and reduce-scatter stays inside a group and
    only the gradient all-reduce between the replicas crosses nodes. `cpu_offload`: FSDP2's CPU offload.
    """

    replicas: int = 1
    group_size: int = 0
    cpu_offload: bool = False

    @property
    def hybrid(self) -> bool:
        return self.replicas > 1

    def describe(self, world_size: int) -> str:
        if self.hybrid:
            return f"hybrid: {self.replicas} replicas x {self.group_size} shards"
        return f"full: 1 copy sharded over {world_size} ranks"

    def mesh(self, device_type: str):
        """The device mesh: 1-D (shard) for full sharding, 2-D (replicate, shard) for hybrid."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.hybrid:
            return init_device_mesh(
                device_type, (self.replicas, self.group_size), mesh_dim_names=("replicate", "shard")
            )
        return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("shard",))


def resolve_layout(
    sharding: str,
    shard_group_size: int,
    world_size: int,
    local_world_size: int,
    fits: Callable[[int], bool],
    cpu_offload: bool = False,
) -> Layout:
    """`sharding` (auto | full | hybrid) and `shard_group_size` (0: a node's processes) as a Layout.

    auto is hybrid when the job spans several nodes and `fits(group_size)` says one group can hold the
    model (then gathers stay on the node at no memory cost that does not fit), else full.
    """
    group = shard_group_size or local_world_size
    if world_size % group:
        raise ValueError(
            f"shard_group_size {group} does not divide the world size {world_size}: pick a divisor "
            "(0 means the processes of one node)"
        )
    hybrid = sharding == "hybrid" or (
        sharding == "auto" and world_size > local_world_size and group < world_size and fits(group)
    )
    if hybrid and group < world_size:
        return Layout(world_size // group, group, cpu_offload)
    return Layout(cpu_offload=cpu_offload)


def uses_fsdp(bf16: bool, cpu_offload: bool = False) -> bool:
    """Whether `shard` applies FSDP: at world size > 1, or in one process for bf16 mixed precision or CPU
    offload."""
    return dist.get_world_size() > 1 or bf16 or cpu_offload


@dataclass(frozen=True)
class Sharding:
    """How a model is sharded (shard, shard_from_rank0, shard_streamed): on `device`, in bf16 mixed
    precision or not, its embedding and head split by vocabulary rows or not, over `layout`'s mesh."""

    device: torch.device
    bf16: bool
    vocab_parallel: bool = False
    layout: Layout = Layout()


def shard(model: nn.Module, how: Sharding) -> nn.Module:
    """FSDP2: one `fully_shard` unit per decoder layer, then the root (norm, and what else is left), over
    the layout's mesh (full or hybrid).

    The input embedding and the output head: with `vocab_parallel`, split by vocabulary rows within the
    shard group and never gathered (vocab_parallel.py); otherwise, untied, each is a unit of its own. A
    single fp32 process has nothing to shard and would only pay FSDP's per-layer overhead (~10%).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from pkg.trainer import vocab_parallel as vp

    device, bf16, layout = how.device, how.bf16, how.layout
    if not uses_fsdp(bf16, layout.cpu_offload):
        return model

    mesh = layout.mesh(device.type)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    if layout.cpu_offload:  # pinned host memory only exists beside a GPU
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    ignored = (
        vp.convert(model, mesh, device, torch.bfloat16 if bf16 else torch.float32)
        if how.vocab_parallel
        else set()
    )
    # Otherwise, with a large vocabulary, the two hold most of the weights (Qwen2.5's 151,936 x 896 twice in
    # a 0.5B model): in the root unit they would stay gathered, with their gradients, for the whole forward
    # and backward. As units of their own each is gathered only while it runs. A tied pair shares one
    # weight and stays in the root.
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is not None and head is not None and getattr(head, "weight", None) is not embedding.weight:
        for module in (embedding, head):
            if not isinstance(module, vp.SPLIT):
                fully_shard(module, **kwargs)
    fully_shard(model, **kwargs, ignored_params=ignored or None)
    return model


def reshard(model: nn.Module) -> None:
    """Free the root unit's gathered weights after a forward with no backward (validation).

    FSDP2 keeps the root's parameters gathered after its forward for the backward to come; without one they
    stay gathered, and the module then holds other parameter objects than the optimizer and a checkpoint
    expect until the next backward reshards them.
    """
    if hasattr(model, "reshard"):
        model.reshard()


def materialize(model: nn.Module, device: torch.device, layout: Layout) -> None:
    """Storage for a meta model's shards and buffers. Under CPU offload FSDP wants its shards in host
    memory; the buffers (rotary tables) still run on the device."""
    if not layout.cpu_offload or device.type == "cpu":
        model.to_empty(device=device)
        return
    model.to_empty(device=torch.device("cpu"))
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)


def shard_from_rank0(model: nn.Module, how: Sharding) -> nn.Module:
    """Shard a model whose weights only rank 0 read whole; the other ranks built it on the meta device.

    The fallback of shard_streamed, for checkpoints that transformers converts on load (load_model_on_meta).

    Every rank shards the same architecture identically, then rank 0's full state dict (base weights and
    its freshly initialised LoRA matrices alike) is broadcast and each rank keeps only its own shards.
    A node thus holds one full copy of the weights in host memory (rank 0's), not one per process.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    on_rank0 = dist.get_rank() == 0
    full = model.state_dict() if on_rank0 else {}  # references to rank 0's tensors, not a copy
    shard(model, how)
    if not on_rank0:
        # storage for this rank's shards and buffers; the values follow
        materialize(model, how.device, how.layout)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    del full
    broadcast_buffers(model)
    return model


def shard_streamed(
    model: nn.Module, how: Sharding, read: Callable[[str, slice | None], torch.Tensor] | None
) -> nn.Module:
    """Shard a model built on the meta device on every rank, then fill the shards from rank 0's `read`.

    Rank 0 reads one tensor at a time (`read(name, rows)` for each of `state_tensors`, `rows` a slice of its
    first dimension or None for all; `read` is None on the other ranks). A tensor whose every part is a block
    of whole rows (FSDP2's shards, vocabulary rows) is read block by block and each block sent to its rank;
    any other is broadcast whole and each rank keeps its part (fill_local). Rank 0 thus holds its shards
    plus one block or tensor, never a whole model next to its shards, and the other ranks their shards plus
    at most one tensor. Buffers outside the state dict (rotary `inv_freq`) keep the values computed when
    the model was built, rank 0's for all.
    """
    shard(model, how)
    device = how.device
    built = {name: b for name, b in model.named_buffers() if not b.is_meta}  # to_empty replaces them
    materialize(model, device, how.layout)  # storage for this rank's shards and buffers
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in built:
                b.copy_(built[name])
        del built
        for name, target in state_tensors(model):
            blocks = _row_blocks(target, device)
            if blocks is not None:
                _send_rows(target, blocks, read and (lambda rows, name=name: read(name, rows)), device)
                continue
            if read is not None:
                full = read(name, None).to(device=device, dtype=target.dtype)
            else:
                full = torch.empty(target.shape, dtype=target.dtype, device=device)
            dist.broadcast(full, src=0)
            fill_local(target, full)
            del full
    broadcast_buffers(model)
    return model


def _row_blocks(target: torch.Tensor, device: torch.device) -> list[slice] | None:
    """The rows every rank holds of a DTensor split (or replicated) along its first dimension only; None for
    a plain tensor or any other layout."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(target, DTensor) or target.ndim == 0:
        return None
    placements = target.placements
    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, placements)
    mine = torch.tensor([offset[0], shape[0]], device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [slice(start, start + rows) for start, rows in (t.tolist() for t in every)]


def _send_rows(
    target: torch.Tensor, blocks: list[slice], read: Callable[[slice], torch.Tensor] | None, device
) -> None:
    """Rank 0 reads each rank's rows of `target` and sends them to it (its own it copies in)."""
    local = target.to_local()
    if read is None:  # another rank: receive its rows straight into its shard
        if blocks[dist.get_rank()].stop > blocks[dist.get_rank()].start:
            direct = local.is_contiguous() and local.device == device  # an offloaded shard: via the device
            buffer = local if direct else torch.empty_like(local, device=device)
            dist.recv(buffer, src=0)
            if buffer is not local:
                local.copy_(buffer)
        return
    for rank, rows in enumerate(blocks):
        if rows.stop > rows.start:
            part = read(rows).to(device=device, dtype=local.dtype)
            if rank == 0:
                local.copy_(part)
            else:
                dist.send(part.contiguous(), dst=rank)
            del part


def fill_local(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` (the whole tensor, on every rank) into `target`.

    A DTensor takes the part its own device mesh and placements give this rank, whichever module or wrapper
    made it (FSDP2's row shards or any other layout), without communication. Row or column blocks and
    replicas are copied straight from a view of `full`; other layouts through `distribute_tensor`, which
    first copies the part out (one more shard-sized tensor).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(target, DTensor):
        target.copy_(full)
        return
    mesh, placements = target.device_mesh, target.placements
    if all(isinstance(p, Shard | Replicate) for p in placements):
        shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
        part = full[tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))]
    else:
        part = distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    target.to_local().copy_(part)


def state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer in module order, a tied tensor once (under
    its first name). The same on every rank for the same architecture, sharded or not."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        skip = module._non_persistent_buffers_set
        persistent = [(k, b) for k, b in module._buffers.items() if k not in skip]
        for key, tensor in [*module._parameters.items(), *persistent]:
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield f"{prefix}.{key}" if prefix else key, tensor


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers to every rank.

    Non-persistent buffers (a rotary embedding's `inv_freq`) are not in the state dict, so on the ranks
    that built the model on the meta device they hold whatever memory `to_empty` handed out.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
