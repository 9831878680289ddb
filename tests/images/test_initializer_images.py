"""The dataset-initializer and model-initializer images, built with buildah and run with podman as a
Kubeflow TrainJob (or the Kubeflow SDK's container backend) runs them: the image's own command, a host
folder at /workspace, the environment the SDK sets, local S3 (moto) and Hub servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.containers import (
    BUILD_SCRIPT,
    build_images,
    image_config,
    image_size,
    make_workspace,
    run_container,
)
from tests.support.hub_server import HubServer, start_hub_server
from tests.support.s3_server import S3Server, start_s3_server

HUB_TOKEN = "hf_ImageTestTokenNeverPrinted"
TARGETS = ["dataset-initializer", "model-initializer"]
MODULES = {"dataset-initializer": "pkg.initializers.dataset", "model-initializer": "pkg.initializers.model"}
# The design's limit for an initializer image (docs/images.md: the sizes measured and what keeps them under).
MAX_IMAGE_BYTES = 200_000_000

DATASET_FILES = {
    "train/part-0.jsonl": b'{"instruction": "Say hi", "output": "hi"}\n' * 200,
    "train/part-1.jsonl": os.urandom(300_000),
    "README.md": b"# tiny dataset\n",
}
MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": os.urandom(2_000_000),
    "tokenizer.json": b'{"version": "1.0"}',
    "pytorch_model.bin": os.urandom(1000),  # ignored by default when safetensors exist
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_images(TARGETS, tmp_path_factory.mktemp("build") / "build.log")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with start_s3_server(auth=True) as server:
        server.fill("datasets", DATASET_FILES, prefix="alpaca-tiny/")
        yield server


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with start_hub_server(tmp_path_factory.mktemp("hub"), token=HUB_TOKEN) as server:
        server.add_repo("acme/tiny-llama", MODEL_FILES, repo_type="model", private=True)
        server.add_repo("acme/tiny-data", DATASET_FILES, repo_type="dataset")
        yield server


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_downloaded(folder: Path, expected: dict[str, bytes]) -> None:
    for rel, body in expected.items():
        path = folder / rel
        assert path.is_file(), f"{rel} missing from {sorted(p.name for p in folder.rglob('*'))}"
        assert sha256(path) == hashlib.sha256(body).hexdigest(), rel
    for path in [folder, *folder.rglob("*")]:
        assert path.stat().st_uid == 1000, f"{path} is owned by uid {path.stat().st_uid}, not 1000"


def test_dataset_initializer_pulls_s3_into_workspace(images, s3, tmp_path):
    workspace = make_workspace(tmp_path / "workspace")
    env = {"STORAGE_URI": "s3://datasets/alpaca-tiny", **s3.env()}
    result = run_container(images["dataset-initializer"], env=env, workspace=workspace)
    assert result.returncode == 0, result.stdout
    assert_downloaded(workspace / "dataset", DATASET_FILES)
    assert s3.secret_access_key not in result.stdout
    assert "Traceback" not in result.stdout

    again = run_container(images["dataset-initializer"], env=env, workspace=workspace)
    assert again.returncode == 0, again.stdout
    assert_downloaded(workspace / "dataset", DATASET_FILES)


def test_model_initializer_pulls_private_hub_repo(images, hub, tmp_path):
    workspace = make_workspace(tmp_path / "workspace")
    env = {"STORAGE_URI": "hf://acme/tiny-llama", "ACCESS_TOKEN": HUB_TOKEN, "HF_ENDPOINT": hub.endpoint}
    result = run_container(images["model-initializer"], env=env, workspace=workspace)
    assert result.returncode == 0, result.stdout
    expected = {k: v for k, v in MODEL_FILES.items() if not k.endswith(".bin")}
    assert_downloaded(workspace / "model", expected)
    assert not (workspace / "model" / "pytorch_model.bin").exists()
    assert HUB_TOKEN not in result.stdout


def test_sdk_container_backend_command(images, hub, tmp_path):
    """The Kubeflow SDK's container backend replaces the command with `bash -c "python -m ..."`."""
    workspace = make_workspace(tmp_path / "workspace")
    env = {"STORAGE_URI": "hf://acme/tiny-data", "HF_ENDPOINT": hub.endpoint, "IGNORE_PATTERNS": "README.md"}
    result = run_container(
        images["dataset-initializer"],
        "bash",
        "-c",
        "python -m pkg.initializers.dataset",
        env=env,
        workspace=workspace,
    )
    assert result.returncode == 0, result.stdout
    expected = {k: v for k, v in DATASET_FILES.items() if k != "README.md"}
    assert_downloaded(workspace / "dataset", expected)
    assert not (workspace / "dataset" / "README.md").exists()


@pytest.mark.parametrize("target", TARGETS)
def test_bad_input_is_one_clear_line(images, target, tmp_path):
    workspace = make_workspace(tmp_path / "workspace")
    result = run_container(images[target], env={"STORAGE_URI": "ftp://nowhere/x"}, workspace=workspace)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout
    assert "ftp" in result.stdout, result.stdout


@pytest.mark.parametrize("target", TARGETS)
def test_image_contract(images, target):
    image = images[target]
    config = image_config(image)
    assert config["User"] == "1000:1000"
    assert config["WorkingDir"] == "/app"
    assert config["Cmd"] == ["python", "-m", MODULES[target]]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == target
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.version"] == image.rsplit(":", 1)[1]
    assert image_size(image) < MAX_IMAGE_BYTES

    # What ships: only pkg/initializers, no compilers, no pip caches; /workspace writable by uid 1000.
    # No huggingface_hub: the Hub source has its own client, so the image does not carry one unused.
    probe = (
        "set -e; id -u; pwd; ls /app/pkg | tr '\\n' ' '; echo; "
        "for tool in gcc cc c++ make; do command -v $tool && exit 3; done; "
        'test ! -e /root/.cache/pip && test ! -e "$HOME/.cache/pip"; '
        "touch /workspace/probe && rm /workspace/probe; "
        f"python -c 'import {MODULES[target]}.__main__' 2>/dev/null || python -c 'import {MODULES[target]}'; "
        "python -c 'import importlib.util as u; "
        'assert u.find_spec("pkg.trainer") is None and u.find_spec("huggingface_hub") is None\'; echo ok'
    )
    result = run_container(image, "bash", "-c", probe)
    assert result.returncode == 0, result.stdout
    uid, cwd, listing, *_ = result.stdout.splitlines()
    assert (uid, cwd) == ("1000", "/app")
    assert listing.split() == ["__init__.py", "initializers"]
    assert result.stdout.rstrip().endswith("ok")


def test_unchanged_image_is_not_rebuilt(images):
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "dataset-initializer"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dataset-initializer is up to date" in result.stdout
