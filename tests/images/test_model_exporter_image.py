"""The model-exporter image, built with buildah from docker-bake.hcl and run with podman as a TrainJob runs
the step: its own command, the volume at /workspace, local S3 (moto) and Hub servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.containers import PODMAN, build_images, image_config, make_workspace, run_container
from tests.images.docs_commands import ROOT, as_podman, docker_runs
from tests.support.hub_server import HubServer, start_hub_server
from tests.support.s3_server import S3Server, start_s3_server

TARGET = "model-exporter"
HUB_TOKEN = "hf_ExporterImageTokenNeverPrinted"
WEIGHTS = os.urandom(6 * 1024 * 1024)  # two 5 MiB parts: S3's smallest part size, as AWS enforces it


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_images([TARGET], tmp_path_factory.mktemp("build") / "build.log")[TARGET]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with start_s3_server(auth=True) as server:
        yield server


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with start_hub_server(tmp_path_factory.mktemp("hub"), token=HUB_TOKEN) as server:
        yield server


def finished_run(tmp_path: Path) -> Path:
    """A workspace whose output/ holds what a LoRA run leaves, as uid 1000 wrote it."""
    workspace = make_workspace(tmp_path / "workspace")
    out = workspace / "output"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (out / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (out / "summary.json").write_text(json.dumps({"steps": 5, "final_loss": 0.5, "method": "lora"}))
    for path in [out, *out.rglob("*")]:
        os.chown(path, 1000, 1000)
    return workspace


def test_the_documented_command_exports_the_adapter_to_s3(image: str, s3: S3Server, tmp_path: Path) -> None:
    """The exporter's `docker run` of docs/images.md and README.md, as written (podman for docker, the local
    server for the reader's MinIO: tests/images/docs_commands.py), with 5 MiB parts: a multipart upload."""
    (command,) = [c for c in docker_runs(ROOT / "docs/images.md") if "model-exporter" in c]
    finished_run(tmp_path)
    s3.client().create_bucket(Bucket="my-bucket")
    env = {
        "PATH": os.environ["PATH"],
        "ACCESS_KEY_ID": s3.access_key_id,
        "SECRET_ACCESS_KEY": s3.secret_access_key,
    }
    local = {"ghcr.io/kubeflow/trainer/model-exporter:v2.0.0": image}
    parts = ["-e", f"INIT_PART_SIZE={5 * 1024 * 1024}"]
    podman = as_podman(command, PODMAN, {"http://minio:9000": s3.endpoint}, parts, local)
    result = subprocess.run(
        ["bash", "-c", podman],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert result.returncode == 0, result.stdout
    assert s3.secret_access_key not in result.stdout and "Traceback" not in result.stdout
    client, prefix = s3.client(), "models/qwen-alpaca-lora/"
    body = client.get_object(Bucket="my-bucket", Key=prefix + "adapter_model.safetensors")["Body"].read()
    assert body == WEIGHTS
    manifest = client.get_object(Bucket="my-bucket", Key=prefix + ".model-exporter/manifest.json")
    files = {f["path"]: f for f in json.loads(manifest["Body"].read())["files"]}
    assert files["adapter_model.safetensors"]["etag"].endswith("-2")  # multipart, checked


def test_exports_the_adapter_to_the_hub(image: str, hub: HubServer, tmp_path: Path) -> None:
    env = {"STORAGE_URI": "hf://acme/lora-1", "ACCESS_TOKEN": HUB_TOKEN, "HF_ENDPOINT": hub.endpoint}
    result = run_container(image, env=env, workspace=finished_run(tmp_path))
    assert result.returncode == 0, result.stdout
    assert HUB_TOKEN not in result.stdout
    assert f"commit {hub.commits[-1]['oid']}" in result.stdout
    assert (hub.repo_dir("acme/lora-1") / "main" / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_bad_input_is_one_clear_line(image: str, tmp_path: Path) -> None:
    result = run_container(image, env={"STORAGE_URI": "s3://models/x"}, workspace=make_workspace(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: SOURCE_PATH=/workspace/output is not a folder: mount the TrainJob")


def test_image_contract(image: str) -> None:
    config = image_config(image)
    assert config["User"] == "1000:1000" and config["WorkingDir"] == "/app"
    assert config["Cmd"] == ["python", "-m", "pkg.model_exporter"]
    assert config["Labels"]["org.opencontainers.image.title"] == TARGET
    probe = (
        "set -e; id -u; ls /app/pkg | tr '\\n' ' '; echo; "
        "for tool in gcc cc make pip; do command -v $tool && exit 3; done; "
        "python -c 'import importlib.util as u, huggingface_hub, model_registry; "
        'assert u.find_spec("pkg.trainer") is None and u.find_spec("hf_xet") is None\'; echo ok'
    )
    result = run_container(image, "bash", "-c", probe)
    assert result.returncode == 0, result.stdout
    uid, listing, *_ = result.stdout.splitlines()
    assert uid == "1000" and listing.split() == ["__init__.py", "initializers", "model_exporter"]
    assert result.stdout.rstrip().endswith("ok")
