"""The llm-trainer image (CPU variant: same Dockerfile on a CPU torch base), fine-tuning the tiny test model.

Not collected by `make test` (the file name does not start with test_): building the image installs
transformers, datasets, peft and the rest into a 1.5 GB image with vfs storage, which takes minutes.
Run it with `make test-images-full` (see docs/images.md for the time it takes).

Like a TrainJob: the image's own entry point (`python -m pkg.trainer.launch`), configured through PET_*
variables, model and dataset in a host folder mounted at /workspace, output written back there as uid 1000.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.images.containers import (
    PODMAN,
    RUN_FLAGS,
    build_images,
    image_config,
    image_size,
    run_container,
    torch_version,
)
from tests.trainer.test_tune import controller_command, sdk, sdk_args
from tests.trainer.tiny import LLAMA3_TOKENS, make_dataset, make_tiny_model

# The first test builds the image (fixture): from cold about 8 min on two idle cores (CPU torch base, then
# the pinned trainer requirements, with vfs copying whole root filesystems), and much longer when the
# machine is shared, which the suite's 600 s default does not cover. Nothing here is timed.
pytestmark = pytest.mark.timeout(2400)

ARGS = [
    "--max-steps=6",
    "--global-batch-size=4",
    "--micro-batch-size=2",
    "--learning-rate=1e-2",
    "--lora-rank=8",
    "--lora-dropout=0",
    "--max-seq-length=128",
    "--save-every=3",
    "--log-every=1",
    "--precision=fp32",
]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_images(["llm-trainer"], tmp_path_factory.mktemp("build") / "build.log")["llm-trainer"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace_with_inputs(path: Path) -> Path:
    """/workspace as the initializers leave it: model/ (with Llama 3's special tokens, which `tune run` of the
    SDK's llama3 configs renders rows with) and dataset/, owned by uid 1000."""
    make_tiny_model(path / "model", special_tokens=LLAMA3_TOKENS)
    make_dataset(path / "dataset", "alpaca", "jsonl")
    for entry in [path, *path.rglob("*")]:
        os.chown(entry, 1000, 1000)
    return path


def assert_trained(workspace: Path, steps: int = 6) -> None:
    output = workspace / "output"
    assert (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert train[-1]["loss"] < train[0]["loss"]
    assert (output / "summary.json").is_file()
    for path in [output, *output.rglob("*")]:
        assert path.stat().st_uid == 1000, f"{path} owned by uid {path.stat().st_uid}"


def test_image_contract(image):
    config = image_config(image)
    assert config["User"] == "1000:1000"
    assert config["WorkingDir"] == "/app"
    assert config["Entrypoint"] == ["python", "-m", "pkg.trainer.launch"]
    assert config["Labels"]["org.opencontainers.image.title"] == "llm-trainer"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HF_HOME"].startswith(env["HOME"])
    probe = (
        "set -e; ls /app/pkg | tr '\\n' ' '; echo; "
        "for tool in gcc cc make; do command -v $tool && exit 3; done; "
        'mkdir -p "$HF_HOME" "$MPLCONFIGDIR"; touch "$HF_HOME/p" "$MPLCONFIGDIR/p" /workspace/p; '
        "python -c 'import importlib.util as u; assert u.find_spec(\"pkg.initializers\") is None'; "
        # `tune` (the SDK's torchtune runtimes run `tune run ...`) is the wrapper that execs the trainer's
        # module: it answers --help, and with a stand-in python first on PATH, which prints what it was
        # given, it is seen passing its arguments on unchanged.
        'test "$(command -v tune)" = /usr/local/bin/tune; tune --help | grep -q "tune run"; '
        "mkdir -p /tmp/shim; "
        "printf '#!/bin/sh\\necho \"$*\"\\n' > /tmp/shim/python; chmod +x /tmp/shim/python; "
        "PATH=/tmp/shim:$PATH tune run lora_finetune_distributed --config llama3_2/1B_lora; "
        "python -c 'import torch, transformers, peft, datasets; print(torch.__version__)'"
    )
    cmd = [*PODMAN, "run", *RUN_FLAGS, "--entrypoint", "bash", image, "-c", probe]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    listing, tune, version = out.stdout.strip().splitlines()
    assert listing.split() == ["__init__.py", "trainer"]
    assert tune == "-m pkg.trainer.tune run lora_finetune_distributed --config llama3_2/1B_lora"
    assert version == f"{torch_version()}+cpu", "the image's torch is the pin the tests run"
    print(f"llm-trainer (CPU) image size: {image_size(image) / 1e6:.0f} MB")


def test_two_process_lora_in_container(image, tmp_path):
    workspace = workspace_with_inputs(tmp_path / "workspace")
    env = {"PET_NPROC_PER_NODE": "2", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    result = run_container(image, *ARGS, env=env, workspace=workspace, extra=["--shm-size", "256m"])
    assert result.returncode == 0, result.stdout[-4000:]
    assert_trained(workspace)


def test_two_nodes_like_a_trainjob(image, tmp_path):
    """Two containers, node ranks 0 and 1, configured only by the PET_* variables Kubeflow sets."""
    workspace = workspace_with_inputs(tmp_path / "workspace")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": port,
        }
        cmd = [*PODMAN, "run", *RUN_FLAGS, "--shm-size", "256m", "--volume", f"{workspace}:/workspace"]
        for key, value in env.items():
            cmd += ["--env", f"{key}={value}"]
        procs.append(
            subprocess.Popen(
                [*cmd, image, *ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert_trained(workspace)


def test_sdk_builtin_trainer_command(image, tmp_path):
    """`tune run` as the SDK's BuiltinTrainer and the controller send it, on the torchtune runtimes' shape:
    the image's `tune` as the container's command, PET_NNODES/NPROC_PER_NODE/NODE_RANK and nothing else."""
    workspace = workspace_with_inputs(tmp_path / "workspace")
    config = sdk.TorchTuneConfig(
        dtype=sdk.DataType.BF16, batch_size=1, epochs=1,
        peft_config=sdk.LoraConfig(lora_rank=8, lora_alpha=16, apply_lora_to_mlp=True),
    )  # fmt: skip
    args = sdk_args(config, "hf://acme/alpaca-tiny")  # dataset.data_dir=/workspace/dataset/.
    argv = controller_command("lora_finetune_distributed", "llama3_2/1B_lora", args, model="/workspace/model")
    env = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0"}
    result = run_container(
        image, *argv, env=env, workspace=workspace, extra=["--shm-size", "256m", "--entrypoint", "tune"]
    )
    assert result.returncode == 0, result.stdout[-4000:]
    output = workspace / "output"
    adapter = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert {"q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == set(
        adapter["target_modules"]
    )
    assert (output / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    summary = json.loads((output / "summary.json").read_text())
    # llama3_2/1B_lora's split train[:95%] of 64 rows = 60, 1 epoch; global batch 1 per device x 2 processes
    # x that config's gradient accumulation 8 = 16: 3 steps
    assert (summary["world_size"], summary["total_steps"], summary["steps"]) == (2, 3, 3)
    assert "precision: bf16" in (output / "config.yaml").read_text()
    for path in [output, *output.rglob("*")]:
        assert path.stat().st_uid == 1000, f"{path} owned by uid {path.stat().st_uid}"


def test_documented_trainer_command_on_a_machine_without_gpu(image, tmp_path):
    """docs/images.md's (and README.md's) `docker run ... llm-trainer` as written, on this GPU-less machine
    (tests/images/docs_commands.py: `--gpus all` left out, the local CPU build's tag): the image's launcher
    answers PET_NPROC_PER_NODE=gpu with one line, not torchrun's `ValueError: Cuda is not available`."""
    from tests.images.docs_commands import ROOT, as_podman, docker_runs

    workspace_with_inputs(tmp_path / "workspace")
    [command] = [c for c in docker_runs(ROOT / "docs/images.md") if "llm-trainer" in c]
    local = {"ghcr.io/kubeflow/trainer/llm-trainer:v2.0.0": image}
    result = subprocess.run(
        ["bash", "-c", as_podman(command, PODMAN, {}, [], local)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: PET_NPROC_PER_NODE=gpu"), result.stdout[-3000:]
    assert "no GPU" in lines[0]
