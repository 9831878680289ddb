"""The planner (`python -m pkg.trainer.plan --device cpu`) against measured peaks, on this CPU machine.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_plan.py [--out .bench/plan.json] [--cases NAME,...]

A model of Qwen2.5's vocabulary (151,936) on a small body (hidden 256, 2 layers, untied: 79M parameters,
where the embedding, the head, their gradients and optimizer state and the loss chunk are most of a rank's
memory above the interpreter), prompt/completion rows, 2 steps. Each case runs the trainer as a job would
(`python -m pkg.trainer`, `torchrun --nproc-per-node 2`, or two `torchrun --nnodes 2 --nproc-per-node 2`
launches on 127.0.0.1), and compares the planner's per-rank total
with rank 0's peak RSS (summary.json: the rank that loads, tokenizes and exports).
Reports predicted / measured; tests/trainer/test_plan.py asserts the same on the small test model. The
4-rank hybrid job is also run fully sharded: its peak beside hybrid's is the memory price of hybrid.
The `floor` cases are bench/bench_full_floor.py's own job, run by its own code (151,936 x 512, 4 layers,
fp32 full fine-tuning, one micro-batch of 4 a step; optimizer_in_backward false, true, and unset: auto,
which steps in the backward there): prompt-heavy rows (the prompts masked, ~18% of the tokens targets)
where the loss block follows the target tokens and the step's gradients replace, rather than join, the
backward's activations and logits.
The planner is told what the trainer tells it at start: the most target tokens a micro-batch holds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import bench_full_floor  # noqa: E402
from bench.bench_trainer import VOCAB, env, free_port, prepare  # noqa: E402

SIZE = {"rows": 48, "hidden": 256, "layers": 2, "vocab": 151_936, "prompt_words": (20, 160)}
SETTINGS = {
    "max_steps": 2,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "max_seq_length": 256,
    "learning_rate": 1e-4,
    "lora_dropout": 0.0,
    "save_every": 0,
    "val_fraction": 0.0,
    "seed": 0,
}
# name -> (nodes, processes per node, precision, method, sharding)
CASES = {
    "1-fp32-full": (1, 1, "fp32", "full", "auto"),
    "1-bf16-lora": (1, 1, "bf16", "lora", "auto"),
    "2-fp32-lora": (1, 2, "fp32", "lora", "auto"),
    "2-bf16-full": (1, 2, "bf16", "full", "auto"),
    "2x2-fp32-full": (2, 2, "fp32", "full", "auto"),  # auto: hybrid (2 replicas x 2 shards)
    "2x2-bf16-lora": (2, 2, "bf16", "lora", "auto"),
    "2x2-fp32-full-sharded": (2, 2, "fp32", "full", "full"),  # the same job fully sharded over 4 ranks
}
# name -> the floor job's optimizer_in_backward (as its command line spells it; None: unset, auto)
FLOOR = {
    "1-fp32-full-floor": "false",
    "1-fp32-full-floor-in-backward": "true",
    "1-fp32-full-floor-auto": None,
}


def log(msg: str) -> None:
    print(f"[bench_plan] {msg}", file=sys.stderr, flush=True)


def cli(args: dict) -> list[str]:
    return [part for k, v in args.items() for part in (f"--{k}", str(v))]


def launch(nodes: int, per_node: int, args: dict) -> None:
    """The trainer as a job runs it; waits for every process."""
    trainer = ["-m", "pkg.trainer", *cli(args)]
    if nodes == 1 and per_node == 1:
        subprocess.run([sys.executable, *trainer], cwd=REPO, env=env(), check=True, capture_output=True)
        return
    port = str(free_port())
    procs = []
    for node in range(nodes):
        extra = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(per_node), "PET_NODE_RANK": str(node),
                 "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port}  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", *trainer]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**env(), **extra}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err[-3000:])


def predict(model: Path, out: Path, nodes: int, per_node: int) -> dict:
    """The planner's estimate for the run in `out` (its saved config.yaml), as `--device cpu` makes it, told
    the most target tokens a micro-batch holds (from the run's tokenized data), as the trainer is."""
    from pkg.trainer import batching, data_cache, plan
    from pkg.trainer.config import load_config

    cfg = load_config(["--config", str(out / "config.yaml")])
    shape = plan.Shape.from_config(json.loads((model / "config.json").read_text()))
    cluster = plan.Cluster(nodes, per_node, plan.host_memory() // per_node, "cpu")
    [cache] = (out / "cache").glob("tokenized-*")
    targets = batching.most_targets(data_cache.read_cache(cache)["train"], cfg.micro_batch_size)
    job = plan.job_from_config(cfg, cfg.precision == "bf16", targets, world_size=nodes * per_node)
    return plan.estimate(shape, job, cluster)


def prepared(work: Path, size: dict) -> tuple[Path, Path]:
    """The model and rows in `work`, made once (--work keeps them)."""
    if (work / "model" / "config.json").exists():
        return work / "model", work / "data"
    return prepare(work, size)


def run_case(name: str, work: Path) -> dict:
    out = work / name
    if name in FLOOR:
        nodes, per_node = 1, 1
        model, data = prepared(work / "floor", VOCAB)
        if not (out / "summary.json").exists():
            bench_full_floor.run_ours(model, data, out, FLOOR[name])
    else:
        nodes, per_node, precision, method, sharding = CASES[name]
        model, data = prepared(work, SIZE)
        args = {**SETTINGS, "model_dir": model, "dataset_dir": data, "output_dir": out}
        args.update(precision=precision, method=method, sharding=sharding)
        if not (out / "summary.json").exists():  # --work: a kept run is predicted again, not rerun
            launch(nodes, per_node, args)
    measured = json.loads((out / "summary.json").read_text())["peak_memory_mb"]
    predicted = predict(model, out, nodes, per_node)
    total = predicted["per_rank"]["total"] / 2**20
    return {
        "name": name,
        "predicted_mb": round(total, 1),
        "rank0_mb": measured,
        "ratio_rank0": round(total / measured, 3),
        "per_rank_mb": {k: round(v / 2**20, 1) for k, v in predicted["per_rank"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join([*CASES, *FLOOR]))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="keep the runs here (a rerun only predicts them again)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for name in args.cases.split(","):
            log(f"{name} ...")
            rows.append(run_case(name, work))
            log(json.dumps(rows[-1]))
    print(
        "| case (nodes x procs, precision, method) | predicted MiB | rank 0 peak MiB | predicted / measured |"
    )
    print("|---|--:|--:|--:|")
    for r in rows:
        print(f"| {r['name']} | {r['predicted_mb']:,.0f} | {r['rank0_mb']:,.0f} | {r['ratio_rank0']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
