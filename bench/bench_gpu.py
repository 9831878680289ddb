"""llm-trainer on one GPU: tokens/s, MFU and peak memory of a 0.5B or 1B model in bf16 (LoRA, full, QLoRA).

Made to run as one prepared command on the `device` tool's machine (one H200, no network, its own torch
and transformers, no `datasets` or `bitsandbytes`). Prepare the wheels here once, in the repo root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl transformers==5.24.0 peft==0.21.2 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
    # QLoRA too (about 60 MB more; the 64 MiB a call allows may then need two calls): bitsandbytes==0.50.2

then call the device with `carry: [".whl"]` and the command

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \\
      && python3 bench/bench_gpu.py --size 0.5b --out $OUT/gpu.json

The real-vocabulary case of bench_trainer.py (vocabulary 151,936, hidden 512, 4 layers, LoRA,
prompt/completion rows with 20-160-word prompts, no packing), peak GPU memory with the chunked loss
(the default loss_chunk_size) and with all target logits at once (one chunk):

      && python3 bench/bench_gpu.py --size vocab --rows prompt_completion --methods lora \\
           --loss-chunk-sizes 0,1000000000 --seq 2048 --batch 16 --micro 8 --out $OUT/gpu-vocab.json

The memory options of a large job (`--variants`, each a separate run beside `base`): FSDP2's CPU offload,
the optimizer stepped in the backward, the 8-bit optimizers, full fine-tuning at 0.5B:

      && python3 bench/bench_gpu.py --size 0.5b --methods full \\
           --variants base,cpu_offload,in_backward,adamw_8bit,paged_adamw_8bit --out $OUT/gpu-memory.json

On a CPU (`--size tiny`, what the test suite runs) it checks the script itself, not the speed.

Each case writes a random model of the real shapes (Qwen2.5-0.5B-like: 24 layers, hidden 896, vocab 151936;
or Llama-3.2-1B-like: 16 layers, hidden 2048, vocab 128256; tied embeddings) and packed sequences of
`--seq` tokens, runs `python -m pkg.trainer` for `--steps` steps, and reports the median tokens/s of the
steps after the first three, MFU against `--peak-tflops` (989: H200/H100 dense bf16) and peak GPU memory.
FLOPs per token: 6 N + 12 L H S for full fine-tuning; 4 N + 12 L H S with a frozen base (no weight
gradients), N the non-embedding parameters plus the output head.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (layers, hidden, intermediate, heads, kv heads, vocab)
SIZES = {
    "tiny": (2, 64, 128, 4, 2, 512),
    "vocab": (4, 512, 1408, 8, 4, 151936),
    "0.5b": (24, 896, 4864, 14, 2, 151936),
    "1b": (16, 2048, 8192, 32, 8, 128256),
}


def log(msg: str) -> None:
    print(f"[bench_gpu] {msg}", file=sys.stderr, flush=True)


def make_model(path: Path, size: str) -> Path:
    """A random Llama-style model of the size's shapes, saved in bf16, with a small BPE tokenizer (the
    embedding keeps the full vocabulary, so the head costs what it would)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.trainer.tiny import make_tokenizer

    transformers.utils.logging.disable_progress_bar()

    layers, hidden, inter, heads, kv, vocab = SIZES[size]
    tokenizer = make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def make_data(path: Path, rows: int, kind: str = "text") -> Path:
    """`text` rows to pack, or `prompt_completion` rows with 20-160-word prompts (targets: the completion)."""
    import random

    from tests.trainer.tiny import WORDS

    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for i in range(rows):
        if kind == "prompt_completion":
            words = rng.choices(WORDS, k=rng.randint(20, 160))
            row = {
                "prompt": "Repeat these words: " + " ".join(words) + ".",
                "completion": " " + " ".join(words[:30]),
            }
            lines.append(json.dumps(row) + "\n")
            continue
        words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(40))
        lines.append(json.dumps({"text": f"Repeat these words: {words}. {words}."}) + "\n")
    (path / "train.jsonl").write_text("".join(lines))
    return path


def flops_per_token(size: str, seq: int, method: str) -> float:
    layers, hidden, inter, heads, kv, vocab = SIZES[size]
    head_dim = hidden // heads
    per_layer = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
    per_layer += 3 * hidden * inter
    n = layers * per_layer + hidden * vocab  # the tied head still does its matmul
    attention = 12 * layers * hidden * seq
    return (6 if method == "full" else 4) * n + attention


# --variants: trainer settings on top of a case (optimizer_in_backward: one micro-batch per step, no clipping)
VARIANTS = {
    "base": {},
    "cpu_offload": {"cpu_offload": True},
    "in_backward": {"optimizer_in_backward": True, "max_grad_norm": 0},
    "adamw_8bit": {"optimizer": "adamw_8bit"},
    "paged_adamw_8bit": {"optimizer": "paged_adamw_8bit"},
    "sgd": {"optimizer": "sgd"},
}


def run_case(
    model: Path,
    data: Path,
    out: Path,
    method: str,
    args: argparse.Namespace,
    chunk: int = 0,
    variant: str = "base",
) -> dict:
    """One training run; `chunk` is loss_chunk_size (0: the trainer's default), `variant` one of VARIANTS."""
    cmd = [sys.executable, "-m", "pkg.trainer", "--model_dir", str(model), "--dataset_dir", str(data)]
    if chunk:
        cmd += ["--loss_chunk_size", str(chunk)]
    settings = {
        "output_dir": out,
        "method": method,
        "max_steps": args.steps,
        "packing": args.rows == "text",
        "max_seq_length": args.seq,
        "global_batch_size": args.batch,
        "micro_batch_size": args.micro,
        "precision": "auto",
        "activation_checkpointing": args.activation_checkpointing,
        "learning_rate": 1e-4 if method == "full" else 2e-4,
        "save_every": 0,
        "log_every": 1,
        **VARIANTS[variant],
    }
    if variant == "in_backward":
        settings["micro_batch_size"] = args.batch
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        error = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"method": method, "variant": variant, "error": error}
    from pkg.trainer.config import TrainConfig

    chunk = chunk or TrainConfig().loss_chunk_size
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    steady = statistics.median(rates[3:] if len(rates) > 4 else rates)
    flops = flops_per_token(args.size, args.seq, method) * steady
    return {
        "method": method,
        "variant": variant,
        "loss_chunk_size": chunk,
        "tokens_per_s": round(steady, 1),
        "tflops": float(f"{flops / 1e12:.4g}"),  # significant digits: a tiny CPU run is not 0
        "mfu": float(f"{flops / (args.peak_tflops * 1e12):.4g}"),
        "peak_memory_mb": summary["peak_memory_mb"],
        "first_loss": records[0].get("loss"),
        "final_loss": records[-1].get("loss"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="0.5b")
    parser.add_argument("--methods", default="lora,full,qlora", help="comma-separated")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="global batch (packed sequences)")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--rows", choices=["text", "prompt_completion"], default="text", help="data kind")
    parser.add_argument(
        "--loss-chunk-sizes", default="0", help="comma-separated loss_chunk_size values to run (0: default)"
    )
    parser.add_argument(
        "--variants", default="base", help=f"comma-separated memory settings to run: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work / "model", args.size)
        data = make_data(work / "data", rows=args.batch * args.steps * args.seq // 64 + 64, kind=args.rows)
        for method in [m for m in args.methods.split(",") if m]:
            if method == "qlora" and not (
                torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")
            ):
                rows.append({"method": method, "error": ["needs CUDA and bitsandbytes"]})
                continue
            for chunk in [int(c) for c in args.loss_chunk_sizes.split(",")]:
                for variant in args.variants.split(","):
                    log(
                        f"{args.size} {method} {variant}, loss chunk {chunk or 'default'}: {args.steps} steps"
                    )
                    out = work / f"out-{method}-{chunk}-{variant}"
                    rows.append(run_case(model, data, out, method, args, chunk, variant))
                    log(json.dumps(rows[-1]))
    report = {"device": device, "torch": torch.__version__, "size": args.size, "seq": args.seq, "rows": rows}
    print(
        f"| {args.size} on {device} | loss chunk | tokens/s | TFLOP/s | MFU | peak MB | loss first -> last |"
    )
    print("|---|--:|--:|--:|--:|--:|---|")
    for r in rows:
        name = r["method"] + (f" {r['variant']}" if r.get("variant", "base") != "base" else "")
        if "error" in r:
            print(f"| {name} | | {'; '.join(r['error'])} | | | | |")
        else:
            print(
                f"| {name} | {r['loss_chunk_size']:,} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} "
                f"| {r['mfu']:.1%} "
                f"| {r['peak_memory_mb']:,.0f} | {r['first_loss']:.3f} -> {r['final_loss']:.3f} |"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in r or r["method"] == "qlora" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
