"""The `docker run` commands of docs/images.md (README.md has the same ones: tests/test_docs.py) run as
written, with podman and the flags the docs give for it, against a local Hub and S3 server; what is
substituted, and why, is in tests/images/docs_commands.py. The trainer's command runs in
full_trainer_image.py, where its image is built."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.containers import PODMAN, build_images
from tests.images.docs_commands import ROOT, as_podman, bash_commands, docker_runs
from tests.support.hub_server import HubServer, start_hub_server
from tests.support.s3_server import S3Server, start_s3_server

TOKEN = "hf_DocsCommandsTokenNeverPrinted"
DATASET = {"train.jsonl": b'{"instruction": "Say hi", "output": "hi"}\n' * 50}
MODEL = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(100_000)}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_images(["dataset-initializer", "model-initializer"], tmp_path_factory.mktemp("b") / "log")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """Stand-ins under the names the docs use (the real ones are gigabytes away, on the internet)."""
    with start_hub_server(tmp_path_factory.mktemp("hub"), token=TOKEN) as server:
        server.add_repo("tatsu-lab/alpaca", DATASET, repo_type="dataset")
        server.add_repo("Qwen/Qwen2.5-0.5B-Instruct", MODEL)
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with start_s3_server(auth=True) as server:
        server.fill("my-bucket", DATASET, prefix="datasets/alpaca/")
        yield server


def documented(tags: dict[str, str]) -> dict[str, str]:
    """The docs' image names -> the local build's tags (the same unless TAG is set for the build)."""
    return {f"ghcr.io/kubeflow/trainer/{name}:v2.0.0": tag for name, tag in tags.items()}


def shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`bash -c command` in `cwd`; `sudo` is the command itself where it is not installed (root here)."""
    prelude = "" if shutil.which("sudo") else 'sudo() { "$@"; }; '
    return subprocess.run(
        ["bash", "-c", prelude + command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def test_initializer_commands_run_as_written(images, hub, s3, tmp_path):
    commands = bash_commands(ROOT / "docs/images.md")
    setup = next(c for c in commands if c.startswith("mkdir -p workspace"))
    runs = [c for c in docker_runs(ROOT / "docs/images.md") if "initializer" in c]
    assert len(runs) == 3  # Hub dataset, model, S3 dataset
    env = {
        "PATH": os.environ["PATH"],
        "HF_TOKEN": TOKEN,
        "ACCESS_KEY_ID": s3.access_key_id,
        "SECRET_ACCESS_KEY": s3.secret_access_key,
    }
    servers = {"http://minio:9000": s3.endpoint}
    hub_flag = ["-e", f"HF_ENDPOINT={hub.endpoint}"]
    assert shell(setup, tmp_path, env).returncode == 0
    for command in runs:
        result = shell(as_podman(command, PODMAN, servers, hub_flag, documented(images)), tmp_path, env)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}"
        assert "done: " in result.stdout and TOKEN not in result.stdout
    workspace = tmp_path / "workspace"
    for folder, files in (("dataset", DATASET), ("model", MODEL), ("dataset-s3", DATASET)):
        for name, body in files.items():
            assert (workspace / folder / name).read_bytes() == body
    assert all(p.stat().st_uid == 1000 for p in workspace.rglob("*"))


def test_a_root_owned_workspace_is_named_before_listing(images, hub, tmp_path):
    """The model command on a workspace left owned by root (the setup line skipped): one line naming the
    image's uid and fsGroup, before the Hub is asked for anything."""
    (tmp_path / "workspace").mkdir()
    model = next(c for c in docker_runs(ROOT / "docs/images.md") if "model-initializer" in c)
    env = {"PATH": os.environ["PATH"], "HF_TOKEN": TOKEN}
    hub.reset_log()
    hub_flag = ["-e", f"HF_ENDPOINT={hub.endpoint}"]
    result = shell(as_podman(model, PODMAN, {}, hub_flag, documented(images)), tmp_path, env)
    assert result.returncode == 1, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert "runs as uid 1000 gid 1000" in errors[0] and "fsGroup: 1000" in errors[0], errors[0]
    assert hub.requests == []
