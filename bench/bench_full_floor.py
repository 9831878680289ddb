"""Full fine-tuning near its memory floor: llm-trainer against torchtune 0.6.1's full_finetune_single_device.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_full_floor.py [--tune /work/venvs/torchtune/bin/tune] \
        [--out .bench/full_floor.json] [--repeat 1]

One process each, CPU, fp32: the real-vocabulary model of bench_trainer.py (151,936 x 512, 4 layers, untied),
its prompt/completion rows, micro batch 4 = global batch 4 (torchtune's optimizer_in_bwd refuses gradient
accumulation), max length 256, AdamW lr 1e-3 without weight decay, constant learning rate, no clipping,
4 steps, the same rows in the same order (torchtune reads them unshuffled in the llm-trainer's order), and
each tool's own export at the end. Each tool with no flag and with optimizer-in-backward set (ours:
`optimizer_in_backward: true`, torchtune: `optimizer_in_bwd: True`); ours also with `optimizer_in_backward:
false`, the A/B of its two ways of stepping: with no flag it steps in the backward here (auto: the same
updates), which the row's "stepped" column checks in its log.

Reports each whole process's peak RSS (os.wait4's ru_maxrss: the process and the children it waited for, so
the llm-trainer's forked tokenizing child counts too; it peaks far below training), tokens/s over the
training loop (non-padding tokens / the loop's time; torchtune's loop time is the sum of its per-step
times), for the llm-trainer also per second of the loop's CPU time (summary.json's train_cpu_s: one thread,
so the work done, which a busy shared machine moves far less than the wall time), and the losses of the
first and last steps as a sanity check (same data, same initial weights). With --repeat the turns are
interleaved; each row keeps its lowest peak and its median speeds, every turn's in brackets. The JSON also
holds the whole process's wall time.
torchtune runs from its own venv (--tune); its tokenizer is bench/torchtune_peer.py over the model's
tokenizer.json. Markdown on stdout, JSON with --out. Where each phase's memory goes: bench/memory_phases.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_trainer import VOCAB, env, log, prepare  # noqa: E402

STEPS, BATCH, SEQ, LR = 4, 4, 256, 1e-3


def measure(cmd: list[str], environ: dict, log_file: Path) -> tuple[float, float]:
    """Run cmd to its end: (peak RSS in MiB, wall seconds)."""
    started = time.monotonic()
    with log_file.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}); see {log_file}")
    return usage.ru_maxrss / 1024, time.monotonic() - started


def run_ours(model: Path, data: Path, out: Path, in_backward: str | None) -> dict:
    """`in_backward`: optimizer_in_backward's value, or None to leave it unset (auto)."""
    args = {
        "model_dir": model, "dataset_dir": data, "output_dir": out, "method": "full", "precision": "fp32",
        "max_seq_length": SEQ, "micro_batch_size": BATCH, "global_batch_size": BATCH, "max_steps": STEPS,
        "learning_rate": LR, "max_grad_norm": 0, "lr_scheduler": "constant", "save_every": 0, "seed": 0,
    }  # fmt: skip
    if in_backward is not None:
        args["optimizer_in_backward"] = in_backward
    cmd = [sys.executable, "-m", "pkg.trainer"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    out.mkdir(parents=True, exist_ok=True)
    log_file = out.parent / f"{out.name}.log"
    rss, wall = measure(cmd, env(), log_file)
    stepped = "in backward" if "stepped in the backward" in log_file.read_text() else "after backward"
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in records if "loss" in r]
    return {
        "peak_rss_mb": rss, "wall_s": wall, "tokens": summary["tokens_seen"],
        "train_time_s": summary["train_time_s"],
        "tokens_per_s": summary["tokens_seen"] / summary["train_time_s"],
        "tokens_per_cpu_s": summary["tokens_seen"] / summary["train_cpu_s"],
        "losses": loss, "stepped": stepped, "command": " ".join(map(str, cmd[1:])),
    }  # fmt: skip


def tune_config(model: Path, rows: Path, out: Path, in_backward: bool) -> dict:
    c = json.loads((model / "config.json").read_text())
    return {
        "output_dir": str(out),
        "tokenizer": {"_component_": "torchtune_peer.tokenizer", "path": str(model), "max_seq_len": SEQ},
        "dataset": {
            "_component_": "torchtune.datasets.instruct_dataset", "source": "json",
            "data_files": str(rows), "split": "train",
            "column_map": {"input": "prompt", "output": "completion"},
            "train_on_input": False, "packed": False,
        },
        "seed": 0, "shuffle": False,
        "model": {
            "_component_": "torchtune.models.llama3.llama3", "vocab_size": c["vocab_size"],
            "num_layers": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
            "num_kv_heads": c.get("num_key_value_heads", c["num_attention_heads"]),
            "embed_dim": c["hidden_size"],
            "max_seq_len": SEQ, "intermediate_dim": c["intermediate_size"], "norm_eps": c["rms_norm_eps"],
            "rope_base": c.get("rope_theta", 10000.0),
        },
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer", "checkpoint_dir": str(model),
            "checkpoint_files": ["model.safetensors"], "recipe_checkpoint": None, "output_dir": str(out),
            "model_type": "LLAMA3",
        },
        "resume_from_checkpoint": False,
        "batch_size": BATCH, "epochs": 1, "max_steps_per_epoch": STEPS, "gradient_accumulation_steps": 1,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": LR, "weight_decay": 0.0},
        "optimizer_in_bwd": in_backward, "clip_grad_norm": None, "compile": False,
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "device": "cpu", "dtype": "fp32", "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out / "logs"),
        },
        "log_every_n_steps": 1, "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }  # fmt: skip


def run_torchtune(tune: str, model: Path, rows: Path, out: Path, in_backward: bool) -> dict:
    import yaml

    shutil.rmtree(out, ignore_errors=True)  # its log files are read back: none of an earlier run's
    out.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(tune_config(model, rows, out, in_backward), sort_keys=False))
    counts = out.parent / f"{out.name}.counts"
    counts.unlink(missing_ok=True)
    environ = {**env(), "PYTHONPATH": str(REPO / "bench"), "TT_PEER_COUNTS": str(counts)}
    cmd = [tune, "run", "full_finetune_single_device", "--config", str(config)]
    rss, wall = measure(cmd, environ, out.parent / f"{out.name}.log")
    steps = []
    for text in (out / "logs").glob("*.txt"):
        for line in text.read_text().splitlines():
            fields = dict(re.findall(r"(\w+):([-\d.e]+)", line))
            if "loss" in fields:
                steps.append({k: float(v) for k, v in fields.items()})
    # Its loop time per step = the step's targets / its tokens per second; the rows' token counts come from
    # the tokenizer (in reading order, unshuffled).
    per_row = [json.loads(line) for line in counts.read_text().splitlines()]
    batches = [per_row[i * BATCH : (i + 1) * BATCH] for i in range(len(steps))]
    loop_s = sum(
        sum(t for _, t in b) / s["tokens_per_second_per_gpu"] for b, s in zip(batches, steps, strict=True)
    )
    tokens = sum(n for b in batches for n, _ in b)
    return {
        "peak_rss_mb": rss, "wall_s": wall, "tokens": tokens, "train_time_s": loop_s,
        "tokens_per_s": tokens / loop_s, "losses": [s["loss"] for s in steps],
        "stepped": "in backward" if in_backward else "after backward", "command": " ".join(cmd[1:]),
    }  # fmt: skip


def ordered_rows(data: Path, dest: Path) -> Path:
    """The rows the llm-trainer trains on, in its order, for torchtune's unshuffled reading."""
    from pkg.trainer import batching
    from pkg.trainer import data as tdata
    from pkg.trainer.config import TrainConfig

    rows = (data / "train.jsonl").read_text().splitlines()
    cfg = TrainConfig(seed=0, val_fraction=0.0)
    train, _ = tdata.split_train_val(list(range(len(rows))), cfg)
    plan = batching.BatchPlan(len(train), BATCH, BATCH, 1, 0, cfg.seed)
    order = [train[i] for step in range(STEPS) for i in plan.global_batch(step)]
    dest.write_text("".join(rows[i] + "\n" for i in order))
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune", default="/work/venvs/torchtune/bin/tune", help="torchtune 0.6.1's `tune`")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the model and outputs here")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="turns per row, interleaved; the lowest peak and the median tokens/s are kept",
    )
    parser.add_argument("--only", choices=("ours", "torchtune"), help="run one tool")
    parser.add_argument("--keep-outputs", action="store_true", help="keep each run's output_dir")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-full-floor-"))
    model, data = prepare(work / "vocab", VOCAB)
    rows_file = ordered_rows(data, work / "ordered.jsonl")
    results: dict = {"settings": {"steps": STEPS, "batch": BATCH, "max_seq_length": SEQ, "lr": LR, **VOCAB}}
    # (row, tool, its setting): no flag, optimizer-in-backward set, and ours with optimizer_in_backward: false
    rows = [
        ("llm-trainer", "ours", None), ("torchtune", "torchtune", False),
        ("llm-trainer in-backward", "ours", "true"), ("torchtune in-backward", "torchtune", True),
        ("llm-trainer false", "ours", "false"),
    ]  # fmt: skip
    tools = {
        "ours": lambda out, setting: run_ours(model, data, out, setting),
        "torchtune": lambda out, setting: run_torchtune(args.tune, model, rows_file, out, setting),
    }
    runs: dict[str, list[dict]] = {}
    for turn in range(args.repeat):  # turns interleaved: a busy spell of the shared machine hits every row
        for key, tool, setting in rows:
            if args.only and tool != args.only:
                continue
            log(f"{key} turn {turn + 1}/{args.repeat} ...")
            out = work / f"{key.replace(' ', '-')}-{turn}"
            r = tools[tool](out, setting)
            if not args.keep_outputs:  # each turn exports the 168M model (and torchtune's copy): ~1.3 GB
                shutil.rmtree(out)
            log(f"{key}: { {k: v for k, v in r.items() if k != 'command'} }")
            runs.setdefault(key, []).append(r)
    for key, turns in runs.items():  # the lowest peak; the speeds: the median, and each turn's
        best = min(turns, key=lambda r: r["peak_rss_mb"])
        results[key] = dict(best)
        for speed in ("tokens_per_s", "tokens_per_cpu_s"):
            if speed in best:
                rates = sorted(r[speed] for r in turns)
                results[key].update({speed: rates[(len(rates) - 1) // 2], f"{speed}_turns": rates})
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def report(results: dict) -> str:
    """Markdown: each row's median speed with every turn's in brackets; ours also per second of the loop's
    CPU time (one thread: the work done, which a busy shared machine moves far less than the wall time)."""
    lines = [
        "| | stepped | peak RSS (MiB) | tokens/s (turns) | tokens per CPU s (turns) | loss step 1 "
        "| loss step 4 |",
        "|---|---|---|---|---|---|---|",
    ]

    def speed(r: dict, key: str) -> str:
        if key not in r:
            return ""
        return f"{r[key]:.0f} ({'/'.join(f'{t:.0f}' for t in r[f'{key}_turns'])})"

    for key, r in results.items():
        if key != "settings":
            lines.append(
                f"| {key} | {r['stepped']} | {r['peak_rss_mb']:.0f} | {speed(r, 'tokens_per_s')} "
                f"| {speed(r, 'tokens_per_cpu_s')} | {r['losses'][0]:.3f} | {r['losses'][-1]:.3f} |"
            )
    pairs = [
        ("no flag", "llm-trainer", "torchtune"),
        ("in-backward", "llm-trainer in-backward", "torchtune in-backward"),
        ("ours no flag / false", "llm-trainer", "llm-trainer false"),
    ]
    for name, a, b in pairs:
        ours, other = results.get(a), results.get(b)
        if ours and other:
            cpu = ""
            if "tokens_per_cpu_s" in other:
                cpu = f"**{ours['tokens_per_cpu_s'] / other['tokens_per_cpu_s']:.2f}x**"
            lines.append(
                f"| **ratio {name}** | | **{ours['peak_rss_mb'] / other['peak_rss_mb']:.2f}x** "
                f"| **{ours['tokens_per_s'] / other['tokens_per_s']:.2f}x** | {cpu} | | |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
