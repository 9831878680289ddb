"""Run by test_rank0_load.py under torchrun (2 processes): distributed.fill_local gives each rank the part
of a whole tensor that distribute_tensor would, for every kind of placement; prints OK on success."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from pkg.trainer.distributed import exit_process, fill_local


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    uneven = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)  # uneven row and column shards
    even = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)  # a strided shard needs even parts
    cases = [(Shard(0), uneven), (Shard(1), uneven), (Replicate(), uneven)]
    cases.append((_StridedShard(0, split_factor=2), even))
    for placement, full in cases:
        target = distribute_tensor(torch.zeros_like(full), mesh, [placement])
        fill_local(target, full)
        expected = distribute_tensor(full, mesh, [placement], src_data_rank=None).to_local()
        assert torch.equal(target.to_local(), expected), (placement, target.to_local(), expected)
        assert torch.equal(target.full_tensor(), full), placement
    plain = torch.zeros(3)
    fill_local(plain, torch.ones(3))
    assert torch.equal(plain, torch.ones(3))
    print(f"rank {dist.get_rank()} OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)
