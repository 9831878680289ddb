"""llm-trainer against TRL's SFTTrainer and DPOTrainer, and FSDP per-rank memory, on CPU.

    .venv/bin/pip install -r requirements/bench.txt          # trl==1.16.0
    .venv/bin/python bench/bench_trainer.py --out .bench/trainer.json [--quick] [--part sft|dpo|all]

1. Throughput: the same tiny Llama-style model, prompt/completion data, sequence length, global and micro
   batch, LoRA rank/targets, learning rate and steps, one process each: `python -m pkg.trainer` and TRL's
   SFTTrainer (completion-only loss, no packing). Reports non-padding tokens/s over the training loop, peak
   RSS and the final training loss (mean of the last 5 steps) so the speed is compared at equal loss.
2. DPO: the same model, LoRA settings, batch shape and steps on preference pairs (prompt/chosen/rejected
   strings; the chosen response follows the prompt, the rejected one does not), sigmoid loss, beta 0.1, the
   reference being the model with its adapter disabled in both: `--objective dpo` against TRL's DPOTrainer.
   Reports the time per optimizer step, peak RSS and the loss trajectory (first, last-5 mean).
3. FSDP memory: full fine-tuning, bytes of parameters + optimizer state held by each rank after two steps, at
   world size 2 (torchrun, gloo) against one process.
4. Real vocabulary (`--part vocab`): the SFT comparison with a random model of Qwen2.5's vocabulary (151,936;
   hidden 512, 4 layers) and prompts of 20-160 words, where the output head and its logits dominate.
5. Whole-run FSDP memory (`--part fsdp`, or `--part fsdp-0.5b` for a model of Qwen2.5-0.5B's shape: 10 GB of
   RAM and disk): full fine-tuning of the real-vocabulary model at world size 2
   against one process: the peak RSS of the largest rank over load, 2 steps, checkpoint and export, and
   the phase that set it.

Markdown on stdout, logs on stderr, JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = {"steps": 20, "rows": 320, "hidden": 256, "layers": 4}
QUICK = {"steps": 6, "rows": 96, "hidden": 128, "layers": 2}
# Qwen2.5's vocabulary on a small body; prompts of 20-160 words (tens to hundreds of tokens).
VOCAB = {"steps": 4, "rows": 64, "hidden": 512, "layers": 4, "vocab": 151_936, "prompt_words": (20, 160)}
VOCAB_QUICK = {**VOCAB, "steps": 3, "rows": 48, "hidden": 256, "layers": 2}
# Qwen2.5-0.5B's shape as a (bias-free) Llama: 494M parameters, tied embeddings, 2 GB in fp32.
QWEN_05B = {**VOCAB, "hidden": 896, "layers": 24, "config": {
    "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64,
    "tie_word_embeddings": True,
}}  # fmt: skip
COMMON = {
    "global_batch_size": 16,
    "micro_batch_size": 4,
    "max_seq_length": 256,
    "learning_rate": 1e-3,
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "seed": 0,
}


def log(msg: str) -> None:
    print(f"[bench_trainer] {msg}", file=sys.stderr, flush=True)


def prepare(work: Path, size: dict) -> tuple[Path, Path]:
    from tests.trainer.tiny import WORDS, make_tiny_model

    model = make_tiny_model(work / "model", hidden=size["hidden"], layers=size["layers"], heads=4)
    if "vocab" in size:  # the tokenizer stays small; the model's head and embeddings get the full vocabulary
        import torch
        from transformers import AutoConfig, LlamaForCausalLM

        config = AutoConfig.from_pretrained(model)
        config.vocab_size = size["vocab"]
        for key, value in size.get("config", {}).items():  # a real model's shape
            setattr(config, key, value)
        for stale in model.glob("model*.safetensors*"):
            stale.unlink()
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(model), safe_serialization=True)
    # Rows of about 50-110 tokens by default, so the benchmark measures training, not per-step overhead.
    rng = random.Random(0)
    rows = []
    for _ in range(size["rows"]):
        words = rng.choices(WORDS, k=rng.randint(*size.get("prompt_words", (20, 60))))
        prompt = "Repeat these words: " + " ".join(words) + "."
        rows.append({"prompt": prompt, "completion": " " + " ".join(words[: rng.randint(10, 30)])})
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def prepare_pairs(work: Path, size: dict) -> Path:
    """Pairs of about 60-110 tokens per sequence: chosen repeats the prompt's words, rejected does not."""
    from tests.trainer.tiny import WORDS

    rng = random.Random(1)
    rows = []
    for _ in range(size["rows"]):
        words = rng.choices(WORDS, k=rng.randint(20, 60))
        n = rng.randint(10, 30)
        rows.append(
            {
                "prompt": "Repeat these words: " + " ".join(words) + ".",
                "chosen": " " + " ".join(words[:n]),
                "rejected": " " + " ".join(rng.choices(WORDS, k=n)),
            }
        )
    data = work / "pairs"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ordered = work / "pairs-ordered"  # for TRL, read in order: the pairs of each of our global batches
    ordered.mkdir(parents=True, exist_ok=True)
    in_order = [rows[i] for i in our_order(len(rows), size["steps"])]
    (ordered / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in in_order))
    return data


def our_order(num_rows: int, steps: int) -> list[int]:
    """The rows the llm-trainer trains on, step by step (no row dropped, no validation split)."""
    from pkg.trainer import batching, data
    from pkg.trainer.config import TrainConfig

    cfg = TrainConfig(seed=COMMON["seed"], val_fraction=0.0)
    train, _ = data.split_train_val(list(range(num_rows)), cfg)
    plan = batching.BatchPlan(
        len(train), COMMON["global_batch_size"], COMMON["micro_batch_size"], 1, 0, cfg.seed
    )
    return [train[i] for step in range(steps) for i in plan.global_batch(step)]


def env() -> dict[str, str]:
    e = {
        k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    e.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


# ---------------------------------------------------------------- throughput


def run_ours(model: Path, data: Path, out: Path, steps: int, **extra) -> dict:
    args = {**COMMON, "model_dir": model, "dataset_dir": data, "output_dir": out, "max_steps": steps}
    args.update(save_every=0, lr_scheduler="constant", max_grad_norm=1.0, **extra)
    cmd = [sys.executable, "-m", "pkg.trainer"]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    subprocess.run(cmd, cwd=REPO, env=env(), check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in records if "loss" in r]
    return {
        "tokens_per_s": summary["tokens_seen"] / summary["train_time_s"],
        "train_time_s": summary["train_time_s"],
        "step_s": summary["train_time_s"] / steps,
        "step_cpu_s": summary["train_cpu_s"] / steps,
        "tokens": summary["tokens_seen"],
        "peak_rss_mb": summary["peak_memory_mb"],
        "final_loss": sum(loss[-5:]) / len(loss[-5:]),
        "first_loss": loss[0],
        "losses": loss,
    }


def trl_worker(kind: str, model: str, data: str, out: str, steps: int) -> None:
    """Runs in its own process: TRL's SFTTrainer or DPOTrainer with the same settings; prints a JSON line."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(COMMON["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ds = datasets.load_dataset("json", data_files=str(Path(data) / "train.jsonl"), split="train")
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    settings = dict(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=COMMON["micro_batch_size"],
        gradient_accumulation_steps=COMMON["global_batch_size"] // COMMON["micro_batch_size"],
        learning_rate=COMMON["learning_rate"],
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=COMMON["max_seq_length"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=COMMON["seed"],
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        use_cpu=True,
        # TRL defaults to activation checkpointing and bf16 autocast; match our fp32 without recompute.
        gradient_checkpointing=False,
        bf16=False,
    )
    if kind == "dpo":  # the reference is the model with the adapter disabled, as in the llm-trainer
        # The rows come in the llm-trainer's batch order (pairs_in_our_order): the same pairs at every step.
        settings["train_sampling_strategy"] = "sequential"
        config, trainer_class = DPOConfig(**settings, beta=0.1, loss_type="sigmoid"), DPOTrainer
    else:
        config, trainer_class = SFTConfig(**settings, packing=False), SFTTrainer
    peft = LoraConfig(
        r=COMMON["lora_rank"], lora_alpha=COMMON["lora_alpha"], lora_dropout=0.0, target_modules="all-linear"
    )
    trainer = trainer_class(
        model=net,
        args=config,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[Losses()],
    )
    started, cpu_started = time.monotonic(), time.process_time()
    trainer.train()
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    tokens = int(trainer.state.num_input_tokens_seen)
    result = {
        "tokens_per_s": tokens / elapsed,
        "train_time_s": elapsed,
        "step_s": elapsed / steps,
        "step_cpu_s": cpu / steps,
        "tokens": tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "first_loss": losses[0],
        "losses": losses,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_trl(model: Path, data: Path, out: Path, steps: int, kind: str = "sft") -> dict:
    cmd = [sys.executable, __file__, "--trl-worker", kind, str(model), str(data), str(out), str(steps)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), check=True, capture_output=True, text=True)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


# ---------------------------------------------------------------- FSDP memory


def fsdp_worker(model: str, data: str, out: str, vocab_parallel: str = "auto") -> None:
    """Under torchrun: full fine-tuning through every phase of a run (load, 2 steps, checkpoint, export);
    the peak RSS after each phase and the bytes of params + optimizer state, per rank."""
    import torch
    import torch.distributed as dist

    from pkg.trainer.config import TrainConfig
    from pkg.trainer.host_memory import return_freed_memory
    from pkg.trainer.recipe import Recipe

    return_freed_memory()  # as `python -m pkg.trainer` does

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = TrainConfig(
        model_dir=model, dataset_dir=data, output_dir=out, method="full", max_steps=2, save_every=2,
        global_batch_size=4, micro_batch_size=2, max_seq_length=64, vocab_parallel=vocab_parallel,
    ).validate()  # fmt: skip
    recipe = Recipe(cfg)
    phases = {}
    recipe.setup()
    phases["load"] = peak_mb()
    for step in range(2):
        recipe.train_step(step)
        recipe.state.step += 1
    phases["train"] = peak_mb()

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local_bytes(p) for p in recipe.model.net.parameters())
    optim = sum(
        local_bytes(v)
        for state in recipe.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    recipe.save_checkpoint()
    phases["checkpoint"] = peak_mb()
    recipe.save()
    phases["export"] = peak_mb()
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"phases": phases, "params_bytes": params, "optimizer_bytes": optim})
    if dist.get_rank() == 0:
        largest = max(everyone, key=lambda r: r["phases"]["export"])
        peak = largest["phases"]["export"]
        Path(out, "memory.json").write_text(
            json.dumps({
                "params_bytes": max(r["params_bytes"] for r in everyone),
                "optimizer_bytes": max(r["optimizer_bytes"] for r in everyone),
                "peak_rss_mb": peak,
                "peak_phase": next(name for name, v in largest["phases"].items() if v >= peak),
                "phases_largest_rank": largest["phases"],
                "ranks": everyone,
            })
        )  # fmt: skip
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp(model: Path, data: Path, work: Path, world: int, vocab_parallel: str = "auto") -> dict:
    out = work / f"fsdp-{world}-{vocab_parallel}"
    shutil.rmtree(out, ignore_errors=True)  # a finished run there would make the recipe stop at setup
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["--master-port", str(free_port()), __file__, "--fsdp-worker", str(model), str(data), str(out)]
    cmd += [vocab_parallel]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"FSDP memory run at world size {world} failed:\n{proc.stderr[-3000:]}")
    for written in ("checkpoints", "model"):  # 4x the model's size on disk; only the figures are kept
        shutil.rmtree(out / written, ignore_errors=True)
    return json.loads((out / "memory.json").read_text())


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer steps")
    parser.add_argument("--workdir", type=Path, help="keep the models and outputs here")
    parser.add_argument("--repeat", type=int, default=3, help="turns per tool; the fastest is kept")
    parser.add_argument(
        "--part",
        choices=("all", "sft", "dpo", "vocab", "fsdp", "fsdp-0.5b"),
        default="all",
        help="which comparisons to run",
    )
    parser.add_argument("--trl-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        kind, m, d, o, s = args.trl_worker
        trl_worker(kind, m, d, o, int(s))
        return 0
    if args.fsdp_worker:
        from pkg.trainer.distributed import exit_process

        fsdp_worker(*args.fsdp_worker)
        exit_process(0)  # a normal exit can abort in gloo's threads

    size = QUICK if args.quick else FULL
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    model, data = prepare(work, size)
    log(f"model hidden={size['hidden']} layers={size['layers']}, {size['rows']} rows, {size['steps']} steps")
    results: dict = {"settings": {**COMMON, **size}}
    report = ""
    if args.part in ("all", "sft"):
        report += sft_section(args, work, model, data, size, results)
    if args.part in ("all", "dpo"):
        report += dpo_section(args, work, model, prepare_pairs(work, size), size, results)
    vocab = VOCAB_QUICK if args.quick else VOCAB
    if args.part in ("all", "vocab"):
        report += vocab_section(args, work / "vocab", vocab, results)
    if args.part in ("all", "fsdp"):
        report += fsdp_section(work / "fsdp", vocab, results)
    if args.part == "fsdp-0.5b":  # ~10 GB of RAM and disk, several minutes: not part of "all"
        report += fsdp_section(work / "fsdp-0.5b", QWEN_05B, results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report)
    return 0


def take_turns(args, work: Path, name: str, ours_fn, trl_fn, key: str) -> tuple[dict, dict]:
    """The tools take turns --repeat times, each keeps its best turn by `key`: shared machines are noisy."""
    ours_runs, trl_runs = [], []
    for turn in range(args.repeat):
        log(f"{name} turn {turn + 1}/{args.repeat}: llm-trainer ...")
        ours_runs.append(ours_fn(work / f"{name}-ours-{turn}"))
        log(f"llm-trainer: { {k: v for k, v in ours_runs[-1].items() if k != 'losses'} }")
        log(f"TRL {name} ...")
        trl_runs.append(trl_fn(work / f"{name}-trl-{turn}"))
        log(f"TRL: { {k: v for k, v in trl_runs[-1].items() if k != 'losses'} }")
    best = min if key.startswith("step_") else max
    return best(ours_runs, key=lambda r: r[key]), best(trl_runs, key=lambda r: r[key])


def sft_turns(args, work: Path, name: str, model: Path, data: Path, steps: int) -> tuple[dict, dict]:
    """SFT, ours against TRL's SFTTrainer on the same model and rows; each tool's best turn by tokens/s."""
    return take_turns(
        args, work, name,
        lambda out: run_ours(model, data, out, steps),
        lambda out: run_trl(model, data, out, steps),
        "tokens_per_s",
    )  # fmt: skip


def sft_section(args, work: Path, model: Path, data: Path, size: dict, results: dict) -> str:
    ours, trl = sft_turns(args, work, "sft", model, data, size["steps"])
    log("FSDP memory at world size 1 and 2 ...")
    mem = {world: run_fsdp(model, data, work, world) for world in (1, 2)}
    per_rank = {w: m["params_bytes"] + m["optimizer_bytes"] for w, m in mem.items()}

    speedup = ours["tokens_per_s"] / trl["tokens_per_s"]
    mem_ratio = per_rank[2] / per_rank[1]
    results.update(
        {
            "llm_trainer": ours,
            "trl": trl,
            "tokens_per_s_ratio": speedup,
            "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
            "fsdp_memory": {str(w): m for w, m in mem.items()},
            "fsdp_per_rank_ratio_2_vs_1": mem_ratio,
            "targets": {"tokens_per_s_ratio": ">= 1.3", "fsdp_per_rank_ratio_2_vs_1": "<= 0.65"},
        }
    )
    mib = 2**20
    return (
        f"### llm-trainer vs TRL SFTTrainer (LoRA r={COMMON['lora_rank']}, CPU, one process)\n\n"
        f"Tiny Llama (hidden {size['hidden']}, {size['layers']} layers), {size['steps']} steps, global batch "
        f"{COMMON['global_batch_size']}, micro batch {COMMON['micro_batch_size']}, max length "
        f"{COMMON['max_seq_length']}, prompt/completion rows of ~80 tokens, completion-only loss; "
        f"best of {args.repeat} alternating turns.\n\n"
        "| | tokens/s | train time (s) | peak RSS (MiB) | first loss | final loss (last 5) |\n"
        "|---|---|---|---|---|---|\n"
        + row("llm-trainer", ours)
        + row(f"TRL {trl_version()}", trl)
        + f"| **ratio** | **{speedup:.2f}x** (target >= 1.3x) | | {results['peak_rss_ratio']:.2f}x | | |\n\n"
        "### FSDP2 full fine-tuning: parameters + optimizer state per rank\n\n"
        "| world size | params (MiB) | optimizer (MiB) | total per rank (MiB) |\n|---|---|---|---|\n"
        + "".join(
            f"| {w} | {m['params_bytes'] / mib:.2f} | {m['optimizer_bytes'] / mib:.2f} "
            f"| {per_rank[w] / mib:.2f} |\n"
            for w, m in mem.items()
        )
        + f"| **2 vs 1** | | | **{mem_ratio:.2f}x** (target <= 0.65x) |\n\n"
    )


def dpo_section(args, work: Path, model: Path, pairs: Path, size: dict, results: dict) -> str:
    ours, trl = take_turns(
        args, work, "dpo",
        lambda out: run_ours(model, pairs, out, size["steps"], objective="dpo", dpo_beta=0.1),
        lambda out: run_trl(model, pairs.with_name("pairs-ordered"), out, size["steps"], kind="dpo"),
        "step_cpu_s",
    )  # fmt: skip
    speed = {k: trl[k] / ours[k] for k in ("step_s", "step_cpu_s")}
    gap = max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"], strict=False))
    results["dpo"] = {
        "llm_trainer": ours,
        "trl": trl,
        "speed_ratio_wall": speed["step_s"],
        "speed_ratio_cpu": speed["step_cpu_s"],
        "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "max_loss_gap": gap,
        "targets": {"speed_ratio": ">= 1.5", "peak_rss_ratio": "<= 1.0"},
    }
    return (
        f"### DPO: llm-trainer vs TRL DPOTrainer (LoRA r={COMMON['lora_rank']}, CPU, one process)\n\n"
        f"The same tiny Llama, {size['steps']} steps, global batch {COMMON['global_batch_size']} pairs, "
        f"micro batch {COMMON['micro_batch_size']} pairs, max length {COMMON['max_seq_length']}, sigmoid "
        "loss, beta 0.1, prompt/chosen/rejected strings of ~60-110 tokens per sequence, the same pairs at "
        "every step (TRL reads them in the llm-trainer's batch order); the reference is the model with its "
        f"adapter disabled in both; best of {args.repeat} alternating turns by CPU time. CPU time per step "
        "is the process's CPU time over the training loop divided by the steps: unlike wall time it does "
        "not grow when other jobs share the cores.\n\n"
        "| | time per step (s) | CPU time per step (s) | peak RSS (MiB) | first loss "
        "| final loss (last 5) |\n"
        "|---|---|---|---|---|---|\n"
        + "".join(
            f"| {name} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | {r['peak_rss_mb']:.0f} "
            f"| {r['first_loss']:.4f} | {r['final_loss']:.4f} |\n"
            for name, r in (("llm-trainer", ours), (f"TRL {trl_version()}", trl))
        )
        + f"| **ratio** | **{speed['step_s']:.2f}x faster** "
        f"| **{speed['step_cpu_s']:.2f}x** (target >= 1.5x) "
        f"| {results['dpo']['peak_rss_ratio']:.2f}x (target <= 1) | | |\n\n"
        f"Largest step-by-step difference between the two loss curves: {gap:.4f}.\n"
    )


def vocab_section(args, work: Path, vocab: dict, results: dict) -> str:
    model, data = prepare(work, vocab)
    ours, trl = sft_turns(args, work, "vocab", model, data, vocab["steps"])
    speed, rss = ours["tokens_per_s"] / trl["tokens_per_s"], ours["peak_rss_mb"] / trl["peak_rss_mb"]
    results["vocab"] = {
        "size": {k: list(v) if isinstance(v, tuple) else v for k, v in vocab.items()},
        "llm_trainer": ours, "trl": trl, "tokens_per_s_ratio": speed, "peak_rss_ratio": rss,
        "targets": {"tokens_per_s_ratio": ">= 5", "peak_rss_ratio": "<= 0.6"},
    }  # fmt: skip
    words = vocab["prompt_words"]
    return (
        "### Real vocabulary: llm-trainer vs TRL SFTTrainer (LoRA, CPU, one process)\n\n"
        f"Random Llama with a {vocab['vocab']:,} vocabulary (Qwen2.5's), hidden {vocab['hidden']}, "
        f"{vocab['layers']} layers; prompts of {words[0]}-{words[1]} words, {vocab['steps']} steps, "
        f"otherwise as above; best of {args.repeat} alternating turns.\n\n"
        "| | tokens/s | train time (s) | peak RSS (MiB) | first loss | final loss (last 5) |\n"
        "|---|---|---|---|---|---|\n"
        + row("llm-trainer", ours)
        + row(f"TRL {trl_version()}", trl)
        + f"| **ratio** | **{speed:.2f}x** (target >= 5x) | | {rss:.2f}x (target <= 0.6x) | | |\n\n"
    )


def fsdp_section(work: Path, vocab: dict, results: dict) -> str:
    """Whole-run FSDP memory of the model `vocab` describes (the real-vocabulary one, or QWEN_05B)."""
    model, data = prepare(work, vocab)
    log("FSDP memory at world size 1 and 2 (vocab_parallel auto, then never) ...")
    runs = {"1": (1, "auto"), "2": (2, "auto"), "2, vocab_parallel never": (2, "never")}
    mem = {name: run_fsdp(model, data, work, world, vp) for name, (world, vp) in runs.items()}
    per_rank = {w: m["params_bytes"] + m["optimizer_bytes"] for w, m in mem.items()}
    rss_ratio = mem["2"]["peak_rss_mb"] / mem["1"]["peak_rss_mb"]
    results.update(
        fsdp_whole_run=mem,
        fsdp_whole_run_params_ratio_2_vs_1=per_rank["2"] / per_rank["1"],
        fsdp_peak_rss_ratio_2_vs_1=rss_ratio,
        fsdp_peak_rss_ratio_2_never_vs_1=mem["2, vocab_parallel never"]["peak_rss_mb"]
        / mem["1"]["peak_rss_mb"],
    )
    mib = 2**20
    phases = list(mem["1"]["phases_largest_rank"])
    return (
        "### FSDP2 full fine-tuning: peak RSS of the largest rank over a whole run\n\n"
        f"A random model of vocabulary {vocab['vocab']:,}, hidden {vocab['hidden']}, {vocab['layers']} "
        f"layers ({'tied' if vocab.get('config', {}).get('tie_word_embeddings') else 'untied'}), full "
        "fine-tuning through load, 2 steps (global batch 4, micro batch 2, max length 64), checkpoint, "
        "export of model/; at world size 2 with the embedding and head split by vocabulary rows "
        "(`vocab_parallel: auto`) and as FSDP units (`never`). "
        "Peak RSS (ru_maxrss) after each phase on the rank with the highest peak; params + optimizer: "
        "bytes each rank holds after the steps.\n\n"
        "| world size | "
        + " | ".join(f"after {p} (MiB)" for p in phases)
        + " | peak set by | params + optimizer per rank (MiB) |\n|---"
        + "|---" * (len(phases) + 2)
        + "|\n"
        + "".join(
            f"| {w} | "
            + " | ".join(f"{m['phases_largest_rank'][p]:.0f}" for p in phases)
            + f" | {m['peak_phase']} | {per_rank[w] / mib:.1f} |\n"
            for w, m in mem.items()
        )
        + "| **2 vs 1** | "
        + " | ".join("" for _ in phases[:-1])
        + f" | **{rss_ratio:.2f}x** (target <= 0.6x) | | {per_rank['2'] / per_rank['1']:.2f}x |\n"
        + "\n"
    )


def row(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['tokens_per_s']:.0f} | {r['train_time_s']:.1f} | {r['peak_rss_mb']:.0f} "
        f"| {r['first_loss']:.3f} | {r['final_loss']:.3f} |\n"
    )


def trl_version() -> str:
    try:
        import trl

        return trl.__version__
    except ImportError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
