"""The planner's `--device cpu` prediction for a finished run, against the run's measured peak RSS."""

from __future__ import annotations

import json
from pathlib import Path

from pkg.trainer import batching, data_cache, plan
from pkg.trainer.config import load_config

TOLERANCE = 0.15  # the bar: within 15% of the measured peak


def predicted_mb(output_dir: Path, nodes: int = 1, per_node: int = 1) -> float:
    """What `python -m pkg.trainer.plan --device cpu` predicts for this run's config.yaml and model, told
    the most target tokens a micro-batch holds (from the run's tokenized data), as the trainer is."""
    cfg = load_config(["--config", str(output_dir / "config.yaml")])
    shape = plan.Shape.from_config(json.loads((Path(cfg.model_dir) / "config.json").read_text()))
    cluster = plan.Cluster(nodes, per_node, plan.host_memory() // per_node, "cpu")
    [cache] = (output_dir / "cache").glob("tokenized-*")
    targets = batching.most_targets(data_cache.read_cache(cache)["train"], cfg.micro_batch_size)
    job = plan.job_from_config(cfg, cfg.precision == "bf16", targets, world_size=nodes * per_node)
    return plan.estimate(shape, job, cluster)["per_rank"]["total"] / 2**20


def assert_plan_matches(output_dir: Path, nodes: int = 1, per_node: int = 1) -> None:
    """Rank 0's peak RSS (summary.json) is within TOLERANCE of the prediction."""
    measured = json.loads((output_dir / "summary.json").read_text())["peak_memory_mb"]
    predicted = predicted_mb(output_dir, nodes, per_node)
    assert abs(predicted / measured - 1) <= TOLERANCE, (
        f"{output_dir.name}: predicted {predicted:.0f} MiB, measured {measured:.0f} MiB"
    )
