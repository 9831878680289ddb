"""docker-bake.hcl as both build paths read it: the buildx-style `--print` of scripts/build_local_images.py,
variables from the environment, inheritance, and agreement with the Dockerfiles."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_local_images.py"
TARGETS = ("dataset-initializer", "model-initializer", "llm-trainer")
ENTRY_POINT = {
    "dataset-initializer": 'CMD ["python", "-m", "pkg.initializers.dataset"]',
    "model-initializer": 'CMD ["python", "-m", "pkg.initializers.model"]',
    "llm-trainer": 'ENTRYPOINT ["torchrun", "-m", "pkg.trainer"]',
}
PACKAGE = {
    "dataset-initializer": "initializers",
    "model-initializer": "initializers",
    "llm-trainer": "trainer",
}


def bake_print(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--print"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    ).stdout
    return json.loads(out)


def test_default_group_and_tags():
    bake = bake_print()
    assert bake["group"]["default"]["targets"] == list(TARGETS)
    for name in TARGETS:
        target = bake["target"][name]
        assert target["tags"] == [
            f"ghcr.io/kubeflow/trainer/{name}:v2.0.0",
            f"ghcr.io/kubeflow/trainer/{name}:latest",
        ]
        assert target["context"] == "."
        # Shared labels and args come from the inherited _common target.
        assert target["labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"
        assert target["labels"]["org.opencontainers.image.version"] == "v2.0.0"
        assert target["args"]["VERSION"] == "v2.0.0"
    assert "_common" not in bake["target"]


def test_variables_come_from_the_environment_like_buildx():
    bake = bake_print(
        REGISTRY="registry.example.com/ml", TAG="v2.1.0-rc1", PLATFORMS="linux/amd64,linux/arm64"
    )
    target = bake["target"]["dataset-initializer"]
    assert target["tags"][0] == "registry.example.com/ml/dataset-initializer:v2.1.0-rc1"
    assert target["platforms"] == ["linux/amd64", "linux/arm64"]
    assert target["labels"]["org.opencontainers.image.version"] == "v2.1.0-rc1"
    assert bake["target"]["llm-trainer"]["platforms"] == ["linux/amd64"], "its CUDA base is amd64 only"


@pytest.mark.parametrize("name", TARGETS)
def test_dockerfile_agrees_with_bake(name):
    target = bake_print()["target"][name]
    dockerfile = (ROOT / target["dockerfile"]).read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    assert base == target["args"]["BASE_IMAGE"], "the Dockerfile default and bake must name the same base"
    for arg in target["args"]:
        assert re.search(rf"^ARG {arg}\b", dockerfile, re.M), f"bake passes {arg}, the Dockerfile lacks it"
    # Each image ships only pkg/__init__.py and its own package.
    sources = re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M)
    assert {s for s in sources if s.startswith("pkg/") and not s.endswith(".txt")} == {
        "pkg/__init__.py",
        f"pkg/{PACKAGE[name]}",
    }
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    # The stage bake builds (named by `target`, else the last) runs the image's own entry point.
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    names = [stage.split("\n", 1)[0].split()[-1] for stage in stages]  # "BASE AS NAME" -> NAME
    stage = stages[names.index(target["target"])] if "target" in target else stages[-1]
    assert ENTRY_POINT[name] in stage and f'image.title="{name}"' in stage


def test_dockerignore_keeps_the_context_small():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*", "ignore everything, then allow what the Dockerfiles copy"
    assert {"!pkg/__init__.py", "!pkg/initializers/", "!pkg/trainer/"} <= set(lines)


def test_unknown_target_is_one_clear_line():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--print", "no-such-image"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: unknown target 'no-such-image'")
    assert "Traceback" not in result.stderr
