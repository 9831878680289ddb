"""Hybrid sharding (HSDP) under real torchrun: 2 launches of `torchrun --nnodes 2 --nproc-per-node 2` on
127.0.0.1 (4 ranks, 2 "nodes") against 1 process, checkpoints resumed across layouts, the vocabulary split
kept within each node, and the layout rule."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pkg.trainer.distributed import Layout, resolve_layout
from tests.trainer.conftest import (
    BASE_ARGS,
    LOSS_TOL,
    ROOT,
    VAL_LOSS_REL,
    assert_same_adapter,
    cli,
    losses,
    ok,
    run_trainer,
    two_nodes,
)
from tests.trainer.plan_check import assert_plan_matches


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def test_four_ranks_on_two_nodes_equal_one_process_and_resume_across_layouts(
    tmp_path, tiny_model, alpaca_data
):
    """hybrid (2 replicas x 2 shards, the vocabulary split within each node) trains like 1 process; a
    hybrid checkpoint resumes under full sharding at world 2, and a full one under hybrid at world 4."""
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "method": "full"}
    args.update(
        learning_rate=2e-3, max_steps=2, save_every=2, lr_scheduler="constant", vocab_parallel="always"
    )
    one, hybrid_then_full, full_then_hybrid = tmp_path / "one", tmp_path / "h-f", tmp_path / "f-h"
    ok(run_trainer({**args, "max_steps": 4, "output_dir": one}))
    reference = losses(one)

    # Steps 1-2 hybrid on 4 ranks (sharding auto: the job spans 2 nodes and fits one), 3-4 full on 2.
    runs = two_nodes(["-m", "pkg.trainer", *cli({**args, "output_dir": hybrid_then_full})], 2, 300)
    log = "".join(ok(r) for r in runs)
    assert "sharding auto (hybrid: 2 replicas x 2 shards)" in log, log[-3000:]
    assert "vocab_parallel: VocabParallelEmbedding, VocabParallelHead" in log
    torch.testing.assert_close(losses(hybrid_then_full), reference[:2], **LOSS_TOL)
    log = ok(run_trainer({**args, "max_steps": 4, "output_dir": hybrid_then_full}, nproc=2))
    assert "resuming from step 2" in log and "sharding auto (full: 1 copy sharded over 2 ranks)" in log

    # Steps 1-2 full on 2 ranks, 3-4 hybrid on 4 (forced: sharding hybrid), the final weights exported.
    ok(run_trainer({**args, "output_dir": full_then_hybrid, "sharding": "full"}, nproc=2))
    resumed = {**args, "max_steps": 4, "output_dir": full_then_hybrid, "sharding": "hybrid"}
    log = "".join(ok(r) for r in two_nodes(["-m", "pkg.trainer", *cli(resumed)], 2, 300))
    assert "resuming from step 2" in log and "sharding hybrid (hybrid: 2 replicas x 2 shards)" in log

    reference_val = json.loads((one / "summary.json").read_text())["final_val_loss"]
    for out in (hybrid_then_full, full_then_hybrid):
        torch.testing.assert_close(losses(out), reference, **LOSS_TOL)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["final_val_loss"] == pytest.approx(reference_val, rel=VAL_LOSS_REL)
        assert_same_adapter(weights(out), weights(one))
    # The planner's per-rank prediction (--device cpu) against rank 0's peak, for each layout's last run.
    assert_plan_matches(one)
    assert_plan_matches(hybrid_then_full, nodes=1, per_node=2)
    assert_plan_matches(full_then_hybrid, nodes=2, per_node=2)


def test_the_vocabulary_split_stays_within_each_node(tmp_path, tiny_model):
    """Every collective of the split embedding and head runs on the node's 2 ranks; only the replicas'
    gradient average crosses nodes, and after it the replicas hold the same gradient."""
    runs = two_nodes([str(ROOT / "tests" / "trainer" / "hybrid_worker.py"), str(tiny_model)], 2, 180)
    assert sum(ok(r).count(" OK") for r in runs) == 4


@pytest.mark.fast
def test_layout_rule():
    def fits(_group: int) -> bool:
        return True

    # auto: hybrid only when the job spans nodes and one node's group holds the model
    assert resolve_layout("auto", 0, 16, 8, fits) == Layout(2, 8)
    assert resolve_layout("auto", 0, 8, 8, fits) == Layout()  # one node
    assert resolve_layout("auto", 0, 16, 8, lambda g: False) == Layout()  # too big for a node: full
    assert resolve_layout("full", 0, 16, 8, fits) == Layout()
    assert resolve_layout("hybrid", 4, 16, 8, fits, cpu_offload=True) == Layout(4, 4, True)
    assert resolve_layout("hybrid", 1, 2, 2, fits) == Layout(2, 1)  # pure replication
    with pytest.raises(ValueError, match="shard_group_size 3 does not divide the world size 16"):
        resolve_layout("hybrid", 3, 16, 8, fits)
