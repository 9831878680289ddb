"""Run by test_hybrid.py as two `torchrun --nnodes 2 --nproc-per-node 2` launches (4 ranks, 2 "nodes"):
under hybrid sharding the vocabulary split's collectives run on the node's ranks only, and only the
replicas' gradient average crosses nodes; prints OK on success."""

from __future__ import annotations

import collections
import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard
from transformers import AutoModelForCausalLM

from pkg.trainer import vocab_parallel as vp
from pkg.trainer.distributed import Layout, Sharding, exit_process, shard
from pkg.trainer.loss import token_logprobs

CALLS: list[tuple[str, str, tuple[int, ...]]] = []  # (calling function, collective, ranks of its group)


def record(name: str):
    original = getattr(dist, name)

    def call(*args, group=None, **kwargs):
        caller = sys._getframe(1).f_code
        if caller.co_filename.endswith(("vocab_parallel.py", "loss.py")):
            ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
            CALLS.append((caller.co_name, name, ranks))
        return original(*args, group=group, **kwargs)

    setattr(dist, name, call)


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    shard(model, Sharding(torch.device("cpu"), bf16=False, vocab_parallel=True, layout=Layout(2, 2)))
    node = (0, 1) if rank < 2 else (2, 3)
    replicas = (rank % 2, rank % 2 + 2)

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, vp.VocabParallelEmbedding) and isinstance(head, vp.VocabParallelHead)
    for module in (embedding, head):
        assert tuple(dist.get_process_group_ranks(module.shard.group)) == node, module.shard
        assert module.weight.placements == (Replicate(), Shard(0)), module.weight.placements
        rows = math.ceil(module.weight.shape[0] / 2)  # split over the node's 2 ranks, not the world's 4
        assert module.weight.to_local().shape[0] in (rows, module.weight.shape[0] - rows)

    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
        record(name)
    ids = torch.randint(0, embedding.num_embeddings, (2, 12), generator=torch.Generator().manual_seed(rank))
    labels = ids.clone()
    labels[:, :3] = -100
    token_logprobs(model, {"input_ids": ids, "labels": labels}, chunk_size=8).logprobs.sum().backward()
    vp.reduce_replicas(model)

    by_caller = collections.defaultdict(set)
    for caller, name, ranks in CALLS:
        by_caller[caller].add((name, ranks))
    assert by_caller.pop("reduce_replica_grad") == {("all_reduce", replicas)}, CALLS
    for caller, calls in by_caller.items():  # the embedding's and head's own exchanges
        assert {ranks for _, ranks in calls} == {node}, (caller, calls)
    assert {"gather_rows", "scatter_sum"} <= set(by_caller), sorted(by_caller)

    # After the average the replicas hold the same gradient of the same rows.
    grad = head.weight.grad.to_local()
    other = torch.empty_like(grad)
    peer = replicas[1] if rank == replicas[0] else replicas[0]
    ops = [dist.P2POp(dist.isend, grad.contiguous(), peer), dist.P2POp(dist.irecv, other, peer)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    assert torch.equal(grad, other)
    print(f"rank {rank} OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)
