"""The whole pipeline in one command: initializers, a 2-process FSDP2 + LoRA fine-tune, the export.

    make demo                                   # embedded tiny model + dataset, local S3, CPU, offline
    make demo MODEL=hf://Qwen/Qwen2.5-0.5B-Instruct DATASET=hf://tatsu-lab/alpaca   # needs internet

Offline, it builds a tiny Llama-style model and a 300-example dataset of our own writing, serves both
from a local S3 server (moto) on 127.0.0.1, runs the real dataset and model initializers against it,
then `torchrun --nproc-per-node 2 -m pkg.trainer`, shows the loss curve and a generation before and after
training, and ends by exporting the adapter with the model exporter to the local S3 server (started for
that alone with MODEL/DATASET) and listing it. Everything lands in `.demo/` (`--workdir`); rerunning starts
from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = {  # library chatter that would drown the story the demo tells
    "OMP_NUM_THREADS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}
SPARK = "▁▂▃▄▅▆▇█"
BUCKET = "demo"
MODEL_PREFIX = "models/tiny-llama"
EXPORT_PREFIX = "exports/tiny-llama-animal-sounds-lora"
DATASET_PREFIX = "datasets/animal-sounds"


def heading(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def build_embedded(source: Path) -> tuple[Path, Path]:
    """The tiny model (with a tokenizer trained on the demo text) and the demo dataset."""
    from demo.dataset import examples, write_jsonl
    from demo.tiny_model import make_tiny_model

    corpus = [f"{r['instruction']} {r['output']}" for r in examples()]
    model = make_tiny_model(source / "model", corpus, vocab=400, hidden=128, layers=2, heads=4, init_std=0.1)
    n = write_jsonl(source / "dataset" / "train.jsonl")
    print(f"tiny Llama-style model: {sum(f.stat().st_size for f in model.iterdir()) / 1e6:.1f} MB in {model}")
    print(f"dataset: {n} instruction examples (animal sounds, 15 phrasings) in {source / 'dataset'}")
    return model, source / "dataset"


def sparkline(values: list[float]) -> str:
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[round((v - low) / span * (len(SPARK) - 1))] for v in values)


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")


def run_initializer(kind: str, uri: str, output: Path, env: dict[str, str]) -> None:
    """The real entry point as the image runs it, with the environment the Kubeflow SDK sets."""
    heading(f"2/5 {kind}-initializer: {uri} -> {output}")
    full_env = {**os.environ, **QUIET, **env, "STORAGE_URI": uri, "OUTPUT_PATH": str(output)}
    subprocess.run([sys.executable, "-m", f"pkg.initializers.{kind}"], env=full_env, cwd=REPO, check=True)


def generate(model_dir: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to one instruction, rendered the way the trainer renders Alpaca rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkg.trainer.rows import ALPACA_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    text = ALPACA_PROMPT.format(instruction=prompt, input="")
    ids = tokenizer(text, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> int:
    os.environ.update(QUIET)
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model URI; empty: the embedded one")
    parser.add_argument("--dataset", default="", help="dataset URI; empty: the embedded dataset")
    parser.add_argument("--workdir", default=str(REPO / ".demo"), help="where everything is written")
    parser.add_argument("--nproc", type=int, default=2, help="trainer processes (torchrun --nproc-per-node)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (0: 200 embedded, 10 real)")
    args = parser.parse_args()
    embedded = not args.model and not args.dataset
    if bool(args.model) != bool(args.dataset):
        parser.error("give both MODEL and DATASET, or neither for the embedded demo")

    started = time.monotonic()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    workspace = work / "workspace"  # what the TrainJob's shared /workspace volume holds
    from tests.support.s3_server import start_s3_server

    server = start_s3_server()  # the sources of the embedded demo, and where every demo exports to
    try:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        env = server.env()
        if embedded:
            heading("1/5 Preparing the embedded model and dataset")
            model_src, dataset_src = build_embedded(work / "source")
            upload(client, model_src, MODEL_PREFIX)
            upload(client, dataset_src, DATASET_PREFIX)
            print(f"serving both from a local S3 server at {server.endpoint} (bucket {BUCKET})")
            model_uri, dataset_uri = f"s3://{BUCKET}/{MODEL_PREFIX}", f"s3://{BUCKET}/{DATASET_PREFIX}"
            run_initializer("dataset", dataset_uri, workspace / "dataset", env)
            run_initializer("model", model_uri, workspace / "model", env)
        else:
            heading("1/5 Using the models and data you named (needs internet)")
            run_initializer("dataset", args.dataset, workspace / "dataset", {})
            run_initializer("model", args.model, workspace / "model", {})
        train_and_show(args, embedded, workspace)
        export(client, workspace / "output", env)
    finally:
        server.stop()
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; everything is in {work}")
    return 0


def export(client, output: Path, env: dict[str, str]) -> None:
    """The model exporter as its image runs it: the adapter to the local S3 server, then listed."""
    uri = f"s3://{BUCKET}/{EXPORT_PREFIX}"
    heading(f"5/5 model-exporter: {output} -> {uri}")
    full_env = {**os.environ, **QUIET, **env, "STORAGE_URI": uri, "SOURCE_PATH": str(output)}
    full_env["EXPORT"] = "adapter"
    subprocess.run([sys.executable, "-m", "pkg.model_exporter"], env=full_env, cwd=REPO, check=True)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=EXPORT_PREFIX + "/")["Contents"]
    for obj in listed:
        print(f"  {obj['Size']:>10,} B  s3://{BUCKET}/{obj['Key']}")


def train_and_show(args: argparse.Namespace, embedded: bool, workspace: Path) -> None:
    """The trainer as its image runs it, then the loss curve and a generation before and after."""
    steps = args.steps or (200 if embedded else 10)
    trainer_args = {
        "model_dir": workspace / "model",
        "dataset_dir": workspace / "dataset",
        "output_dir": workspace / "output",
        "method": "lora",
        "max_steps": steps,
        "log_every": 10 if embedded else 1,
        "save_every": 100 if embedded else 0,
    }
    if embedded:  # a random model needs a high learning rate to learn in a minute
        trainer_args |= {"learning_rate": 5e-3, "global_batch_size": 16, "micro_batch_size": 8}
    else:
        trainer_args |= {"global_batch_size": 8, "micro_batch_size": 1, "max_seq_length": 256}
    cmd = ["torchrun", f"--nproc-per-node={args.nproc}", "-m", "pkg.trainer"]
    cmd += [f"--{key}={value}" for key, value in trainer_args.items()]
    heading("3/5 llm-trainer: " + " ".join(cmd))
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), *cmd[1:]], cwd=REPO, check=True)

    heading("4/5 What happened")
    output = workspace / "output"
    summary = json.loads((output / "summary.json").read_text())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"trained {summary.get('steps', steps)} steps on {args.nproc} processes (FSDP2 + LoRA)")
    if losses:
        print(f"loss: {losses[0]:.3f} at the first logged step -> {losses[-1]:.3f} at the last")
        print(f"      {sparkline(losses)}  (one bar per logged step)")
    print(f"loss curve: {output / 'loss.png'}")
    print(f"adapter: {output / 'adapter'}   metrics: {output / 'metrics.jsonl'}")
    prompt = "What sound does a cow make?" if embedded else "Give three tips for staying healthy."
    tokens = 12 if embedded else 48
    before = printable(generate(workspace / "model", None, prompt, tokens))
    after = printable(generate(workspace / "model", output / "adapter", prompt, tokens))
    print(f"\nprompt:          {prompt}")
    print(f"before training: {before}")
    print(f"after training:  {after}   (base model + the saved adapter, loaded with peft)")


if __name__ == "__main__":
    sys.exit(main())
