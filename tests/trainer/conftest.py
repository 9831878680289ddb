"""Shared fixtures: one tiny model per session, small datasets, and a helper that runs the trainer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pkg.trainer import batching, data_cache
from tests.trainer.tiny import LLAMA3_TOKENS, make_dataset, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# Small, fast and learnable: 8 optimizer steps of 8 samples.
BASE_ARGS = {
    "max_steps": 8,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "learning_rate": 1e-2,
    "lora_dropout": 0.0,
    "lora_rank": 8,
    "val_fraction": 0.125,
    "max_seq_length": 128,
    "save_every": 0,
    "log_every": 1,
}


# Tolerances of the equivalence tests (1 process vs 2 vs 2 nodes; a resumed run vs an uninterrupted one), from
# `bench/measure_equivalence.py --seeds 5 --threads 1,2`: the largest gap over those 10 runs of the tiny LoRA
# job, times a margin for other CPUs' kernels and summation orders. Each stays far below what a bug moves (a
# mis-scaled loss, a wrong shard or a lost step shifts losses and adapters by 1e-2 or more).
LOSS_TOL = {"rtol": 2e-5, "atol": 2e-5}  # losses step by step: measured <= 1e-6 abs, 2e-7 rel (20x)
# Adapters: Adam divides each gradient by its running RMS, so an element whose gradient is ~0 turns summation
# noise into a step of up to lr (1e-2): single elements differed by up to 1e-4 (0.07% of their tensor's
# largest). The tensor as a whole is what the model sees: ||got - want|| / ||want|| per tensor, measured
# <= 5.9e-5 (17x); for Qwen3-MoE at 1 vs 2 processes (test_archs.py) 5.7e-6.
ADAPTER_REL_NORM = 1e-3
# A run's final val_loss re-computed from its exported adapter or model: measured <= 9.3e-8 relative here and
# <= 1.2e-7 over the 13 architectures of test_archs.py; 1e-4 stands for another summation order (800x) and
# is still 100x below a wrong or stale export.
VAL_LOSS_REL = 1e-4
# Merged model vs base + adapter through peft, logits: measured <= 4e-7 abs here, <= 7.7e-7 over the
# architectures of test_archs.py (Phi-3's fused projections); 1e-4 (130x).
LOGITS_TOL = {"rtol": 1e-4, "atol": 1e-4}


def assert_same_adapter(got: dict, want: dict) -> None:
    """Same tensors (names and shapes), each within ADAPTER_REL_NORM of the reference by norm."""
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for key, tensor in got.items():
        gap = float((tensor - want[key]).norm() / want[key].norm().clamp_min(1e-12))
        assert gap <= ADAPTER_REL_NORM, f"{key}: relative gap {gap:.3g} > {ADAPTER_REL_NORM}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def tiny_llama3_model(tmp_path_factory) -> Path:
    """The tiny model with Llama 3's special tokens, which `tune run` of a llama3 config needs in a folder."""
    return make_tiny_model(tmp_path_factory.mktemp("llama3_model"), special_tokens=LLAMA3_TOKENS)


@pytest.fixture(scope="session")
def alpaca_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("alpaca"), "alpaca", "jsonl")


def cli(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        out += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def trainer_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PET_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra})
    return env


@pytest.fixture(autouse=True)
def own_log_handlers():
    """The root logger's handlers as they were before the test: an entry point run in-process (main(),
    tune.main()) binds a handler to the sys.stdout of its test, which pytest closes afterwards; a later test's
    log line would then print "--- Logging error ---" to stderr."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MARKER = "TRAINER_TEST_MARKER"


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a launch; every process of it carries a marker in its environment so all can be killed."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, MARKER: marker},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc.marker = marker  # type: ignore[attr-defined]
    return proc


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a launch: torchrun puts its workers in sessions of their own, so killing
    its process group would leave orphans holding the output pipes open."""
    tag = f"{MARKER}={proc.marker}".encode()  # type: ignore[attr-defined]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError, ValueError):
            if tag in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: int) -> subprocess.CompletedProcess:
    """Wait for a launch; on timeout kill all of it (torchrun and its workers) and fail with its output."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{(out + err)[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(nproc: int) -> list[str]:
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
    ]


def run_trainer(args: dict, nproc: int = 0, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m pkg.trainer` (nproc 0) or `torchrun --nproc-per-node N -m pkg.trainer`."""
    cmd = [*torchrun(nproc), "-m", "pkg.trainer"] if nproc else [PYTHON, "-m", "pkg.trainer"]
    return finish(start(cmd + cli(args), trainer_env(**env)), timeout)


def two_nodes(
    target: list[str] | Callable[[int], list[str]],
    nproc_per_node: int = 1,
    timeout: int = 240,
    **extra_env: str,
) -> list[subprocess.CompletedProcess]:
    """Two torchrun launches on 127.0.0.1 configured only through PET_* variables, like a TrainJob's two
    nodes; `target` is what torchrun runs (`-m pkg.trainer ...`, or a script and its arguments), or what
    the node of each rank runs."""
    port = str(free_port())
    procs = []
    for node_rank in (0, 1):
        node_target = target(node_rank) if callable(target) else target
        env = trainer_env(
            PET_NNODES="2",
            PET_NPROC_PER_NODE=str(nproc_per_node),
            PET_NODE_RANK=str(node_rank),
            PET_MASTER_ADDR="127.0.0.1",
            PET_MASTER_PORT=port,
            **extra_env,
        )
        procs.append(start([PYTHON, "-m", "torch.distributed.run", *node_target], env))
    return [finish(p, timeout) for p in procs]


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a run that must have succeeded (its tail in the failure otherwise)."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def val_loss(model, output_dir: Path, packing: bool = False) -> float:
    """Token-weighted loss of `model` on the run's cached validation records."""
    [cache] = (output_dir / "cache").glob("tokenized-*")
    val = data_cache.read_cache(cache)["val"]
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in val:
            batch = batching.collate([rec], pad_id=0, packing=packing)
            labels = batch.pop("labels")[0, 1:]
            logits = model(**batch, use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(
                logits, labels, ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    return total / count


def check_exported_adapter(model_dir: Path, out: Path, final_val_loss: float) -> None:
    """The run's adapter, loaded by peft alone, reproduces its final validation loss; its merged model/ (if
    written), loaded by transformers alone, gives the logits of base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert val_loss(tuned, out) == pytest.approx(final_val_loss, rel=VAL_LOSS_REL)
    if (out / "model").exists():
        merged = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
        ids = torch.tensor([[0, 5, 17, 99, 200, 31, 7]])
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, **LOGITS_TOL)


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """Run main() here (one rank) with a clean distributed environment; returns its exit code."""
    from pkg.trainer.__main__ import main

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "")  # recorded, so that what main() sets is undone after the test
        monkeypatch.delenv(var)

    def run(args: dict) -> int:
        return main(cli({**BASE_ARGS, "output_dir": tmp_path / "out", **args}))

    return run
