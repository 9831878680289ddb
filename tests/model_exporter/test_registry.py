"""Registration in Kubeflow Model Registry with the `model-registry` client, against a contract server
(tests/support/model_registry_server.py: the client's endpoints from the published OpenAPI spec; not the real
registry): model, version and artifact with the destination URI, safetensors and the run's metrics; a rerun
finds it registered; 503s are retried; a wrong token is one line, without the token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.model_registry_server import ModelRegistryServer

from .conftest import Exporter, one_error_line, write_run

TOKEN = "mr-token-that-must-never-be-printed-1234"


@pytest.fixture(scope="module")
def registry() -> Iterator[ModelRegistryServer]:
    with ModelRegistryServer(token=TOKEN).start() as server:
        yield server


def test_register_after_export_then_rerun(
    registry: ModelRegistryServer, export: Exporter, tmp_path: Path
) -> None:
    out = write_run(tmp_path)
    dest = tmp_path / "models" / "qwen-lora"
    env = {
        "STORAGE_URI": f"file://{dest}",
        "SOURCE_PATH": str(out),
        "MODEL_REGISTRY_URL": registry.endpoint,
        "MODEL_REGISTRY_TOKEN": TOKEN,
    }
    registry.fail = 2  # the registry is briefly unavailable: retried
    done = export(**env)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert "qwen-lora version abc123def456 registered" in done.stdout
    (model,) = registry.store["registered_models"]
    assert model["name"] == "qwen-lora"
    (version,) = registry.store["model_versions"]
    assert version["name"] == "abc123def456" and version["registeredModelId"] == model["id"]
    assert version["customProperties"]["base_model"]["string_value"] == "hf://acme/base-1b"
    assert version["customProperties"]["final_loss"]["double_value"] == 1.25
    (artifact,) = registry.store["artifacts"]
    assert artifact["uri"] == f"file://{dest}" and artifact["modelFormatName"] == "safetensors"

    again = export(**env)
    assert again.returncode == 0, again.stderr
    assert "already registered" in again.stdout and len(registry.store["artifacts"]) == 1

    other = export(**{**env, "STORAGE_URI": f"file://{tmp_path / 'elsewhere' / 'qwen-lora'}"})
    assert other.returncode == 1 and "set MODEL_VERSION" in one_error_line(other.stderr)

    denied = export(**{**env, "MODEL_REGISTRY_TOKEN": "wrong-token-wrong-token", "MODEL_VERSION": "v2"})
    assert denied.returncode == 1
    line = one_error_line(denied.stderr)
    assert "HTTP 401" in line and "MODEL_REGISTRY_TOKEN" in line and "wrong-token" not in line
