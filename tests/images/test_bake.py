"""docker-bake.hcl as both build paths read it: the buildx-style `--print` of scripts/build_local_images.py,
variables from the environment, inheritance, and agreement with the Dockerfiles."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_local_images.py"
TARGETS = ("dataset-initializer", "model-initializer", "llm-trainer", "model-exporter")
ENTRY_POINT = {
    "dataset-initializer": 'CMD ["python", "-m", "pkg.initializers.dataset"]',
    "model-initializer": 'CMD ["python", "-m", "pkg.initializers.model"]',
    "llm-trainer": 'ENTRYPOINT ["python", "-m", "pkg.trainer.launch"]',
    "model-exporter": 'CMD ["python", "-m", "pkg.model_exporter"]',
}
PACKAGES = {  # the exporter reuses the initializers' transfer code: it ships both packages
    "dataset-initializer": {"initializers"},
    "model-initializer": {"initializers"},
    "llm-trainer": {"trainer"},
    "model-exporter": {"initializers", "model_exporter"},
}


def bake_print(*args: str, **env: str) -> dict:
    return json.loads(_bake_print(args, tuple(sorted(env.items()))))


@functools.cache
def _bake_print(args: tuple[str, ...], env: tuple[tuple[str, str], ...]) -> str:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--print", *args],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **dict(env)},
    ).stdout


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
        # Shared labels come from the inherited _labels target; the args that set them in the
        # Dockerfile (from _image) go to the target whose Dockerfile has the LABEL instruction.
        assert target["labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"
        assert target["labels"]["org.opencontainers.image.version"] == "v2.0.0"
    for name in ("initializer-base", "llm-trainer"):
        assert bake["target"][name]["args"]["VERSION"] == "v2.0.0"
    assert not any(name.startswith("_") for name in bake["target"])


def test_variables_come_from_the_environment_like_buildx():
    bake = bake_print(
        REGISTRY="registry.example.com/ml", TAG="v2.1.0-rc1", PLATFORMS="linux/amd64,linux/arm64"
    )
    target = bake["target"]["dataset-initializer"]
    assert target["tags"][0] == "registry.example.com/ml/dataset-initializer:v2.1.0-rc1"
    assert target["platforms"] == ["linux/amd64", "linux/arm64"]
    assert target["labels"]["org.opencontainers.image.version"] == "v2.1.0-rc1"
    assert bake["target"]["llm-trainer"]["platforms"] == ["linux/amd64"], "its CUDA base is amd64 only"


def test_one_folder_per_image():
    """The layout the design names: images/<image>/Dockerfile, which the bake targets point at."""
    bake = bake_print()["target"]
    for name in TARGETS:
        assert bake[name]["dockerfile"] == f"images/{name.replace('-', '_')}/Dockerfile"
    assert not (ROOT / "images" / "initializer").exists()


def stage_of(dockerfile: str, target: dict) -> str:
    """The stage bake builds: the one named by `target`, else the last."""
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    names = [stage.split("\n", 1)[0].split()[-1] for stage in stages]  # "BASE AS NAME" -> NAME
    return stages[names.index(target["target"])] if "target" in target else stages[-1]


def dockerfile_chain(bake: dict, name: str) -> list[tuple[dict, str]]:
    """(target, Dockerfile text) of `name` and of the targets it is built FROM through bake contexts."""
    target = bake[name]
    dockerfile = (ROOT / target["dockerfile"]).read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    if base in target.get("contexts", {}):
        assert target["contexts"][base].startswith("target:"), f"FROM {base}: a context built by bake"
        return [
            (target, dockerfile),
            *dockerfile_chain(bake, target["contexts"][base].removeprefix("target:")),
        ]
    return [(target, dockerfile)]


@pytest.mark.parametrize("name", TARGETS)
def test_dockerfile_agrees_with_bake(name):
    bake = bake_print()["target"]
    chain = dockerfile_chain(bake, name)
    for target, dockerfile in chain:
        for arg in target.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", dockerfile, re.M), (
                f"bake passes {arg}, its Dockerfile lacks it"
            )
    for provider, _ in chain[1:]:
        assert provider["output"] == ["type=cacheonly"], "a shared base is built, never pushed on its own"
    # At the bottom, the registry base: the Dockerfile default and bake name the same one.
    bottom, dockerfile = chain[-1]
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    assert re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1) == bottom["args"]["BASE_IMAGE"]
    text = "\n".join(dockerfile for _, dockerfile in chain)
    # Each image ships only pkg/__init__.py and its own packages.
    sources = re.findall(r"^COPY (?!--from)(\S+)", text, re.M)
    assert {s for s in sources if s.startswith("pkg/") and not s.endswith(".txt")} == {
        "pkg/__init__.py",
        *(f"pkg/{package}" for package in PACKAGES[name]),
    }
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert re.search(r"^WORKDIR /app$", text, re.M)
    stage = stage_of(chain[0][1], chain[0][0])
    assert ENTRY_POINT[name] in stage and f'image.title="{name}"' in stage


def test_shared_initializer_base_is_built_once_for_both():
    bake = bake_print()
    users = ("dataset-initializer", "model-initializer", "model-exporter")
    contexts = {bake["target"][name].get("contexts", {}).get("base") for name in users}
    assert contexts == {"target:initializer-base"}
    assert "initializer-base" in bake["target"], "--print lists the targets named as contexts, like bake"
    assert "initializer-base" not in bake["group"]["default"]["targets"]


def test_one_torch_pin_for_tests_and_image():
    """requirements/torch.txt is the pin: dev.txt (the tests' install) includes it, the llm-trainer
    Dockerfile installs it, the local CPU variant reads it, and it is the torch this venv runs."""
    pins = re.findall(r"^torch==(\S+)$", (ROOT / "requirements" / "torch.txt").read_text(), re.M)
    assert len(pins) == 1
    dev = (ROOT / "requirements" / "dev.txt").read_text()
    assert re.search(r"^-r torch\.txt$", dev, re.M)
    assert not re.search(r"^torch\b", dev, re.M), "no second torch pin"
    dockerfile = (ROOT / "images" / "llm_trainer" / "Dockerfile").read_text()
    assert re.search(r"^COPY requirements/torch\.txt ", dockerfile, re.M)
    assert "pip install --no-cache-dir -r /tmp/requirements/torch.txt" in dockerfile
    script = subprocess.run(
        [sys.executable, "-c", "import build_local_images as b; print(b.TORCH_VERSION, b.TORCH_BASE)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT / "scripts",
    ).stdout.split()
    assert script == [pins[0], f"localhost/kft-base-torch-cpu:{pins[0]}"]
    assert importlib.metadata.version("torch").split("+")[0] == pins[0], "the tests run another torch"


def test_tune_wrapper_execs_the_trainer_module(tmp_path):
    """images/llm_trainer/tune (on PATH in the image) runs `python -m pkg.trainer.tune ARGS...` unchanged."""
    (tmp_path / "python").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s|" "$a"; done\n')
    (tmp_path / "python").chmod(0o755)
    wrapper = ROOT / "images" / "llm_trainer" / "tune"
    assert wrapper.stat().st_mode & 0o111, "COPY keeps the mode: the file must be executable"
    args = [
        "run",
        "lora_finetune_distributed",
        "--config",
        "llama3_2/1B_lora",
        "dataset.new_system_prompt=a b",
    ]
    out = subprocess.run(
        [str(wrapper), *args], capture_output=True, text=True, check=True, env={"PATH": f"{tmp_path}:/bin"}
    ).stdout
    assert out == "|".join(["-m", "pkg.trainer.tune", *args]) + "|"
    dockerfile = (ROOT / "images" / "llm_trainer" / "Dockerfile").read_text()
    assert re.search(r"^COPY images/llm_trainer/tune /usr/local/bin/tune$", dockerfile, re.M)


def test_dockerignore_keeps_the_context_small():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "*", "ignore everything, then allow what the Dockerfiles copy"
    assert {"!pkg/__init__.py", "!pkg/initializers/", "!pkg/trainer/"} <= set(lines)
    assert {"!requirements/torch.txt", "!images/llm_trainer/tune"} <= set(lines)


def test_unknown_target_is_one_clear_line():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--print", "no-such-image"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: unknown target 'no-such-image'")
    assert "Traceback" not in result.stderr


# A bake file as people write them: comments of all three kinds, blocks and attributes in any order (the
# parent after its child, variables after their use), a variable built from another, bake functions, a
# conditional, quoted keys, an escaped interpolation, a named context, and one-line blocks.
ORDINARY_BAKE = """
/* Release images.
   REGISTRY=... docker buildx bake */
target "app" {
  tags = [
    "${REGISTRY}/app:${TAG}", lower("${REGISTRY}/APP:latest"),
    format("%s/app:%s-%d", REGISTRY, TAG, 1),  # a trailing comma, as HCL allows
  ]
  inherits  = ["_base"]   # the parent comes later in the file
  platforms = split(",", PLATFORMS)
  contexts  = { base = "target:base" }
  args = {
    CHANNEL        = notequal("", SUFFIX) ? "pre" : "stable"
    "WITH.DOTS"    = "$${NOT_INTERPOLATED} %%{literal}"
    JOINED         = join("+", ["a", trimprefix(TAG, "v")])
    PYTHON_VERSION = "3.${MINOR}"
  }
}

target "base" { dockerfile = "base.Dockerfile" }

// Defaults for every target.
target "_base" {
  context = "."
  args    = { CHANNEL = "overridden by the child", FROM_PARENT = "yes" }
}

group "default" { targets = ["app"] }

variable "PLATFORMS" { default = "linux/amd64,linux/arm64" }
variable "TAG" { default = "v${MAJOR}.0${SUFFIX}" }
variable "MAJOR" { default = 2 }
variable "MINOR" { default = 11 }
variable "SUFFIX" { default = "" }
variable "REGISTRY" {
  # hash comment inside a block
  default = "ghcr.io/acme"
}
"""


def test_ordinary_bake_file(tmp_path):
    path = tmp_path / "docker-bake.hcl"
    path.write_text(ORDINARY_BAKE)
    bake = bake_print("--file", str(path))
    assert bake["group"]["default"]["targets"] == ["app"]
    assert list(bake["target"]) == ["app", "base"], "requested targets, then those named as contexts"
    app = bake["target"]["app"]
    assert app["context"] == "."
    assert app["tags"] == ["ghcr.io/acme/app:v2.0", "ghcr.io/acme/app:latest", "ghcr.io/acme/app:v2.0-1"]
    assert app["platforms"] == ["linux/amd64", "linux/arm64"]
    assert app["contexts"] == {"base": "target:base"}
    assert app["args"] == {
        "CHANNEL": "stable",
        "FROM_PARENT": "yes",
        "WITH.DOTS": "${NOT_INTERPOLATED} %{literal}",
        "JOINED": "a+2.0",
        "PYTHON_VERSION": "3.11",
    }
    assert bake["target"]["base"] == {"dockerfile": "base.Dockerfile"}

    # The environment overrides variables, typed like their default; derived values follow.
    bake = bake_print("--file", str(path), MAJOR="3", SUFFIX="-rc1", REGISTRY="registry.example.com")
    app = bake["target"]["app"]
    assert app["tags"][0] == "registry.example.com/app:v3.0-rc1"
    assert app["args"]["CHANNEL"] == "pre"
    assert app["args"]["JOINED"] == "a+3.0-rc1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('target "t" {\n  tags = [sha1("x")]\n}\n', "line 2: function sha1() is not supported"),
        ('target "t" {\n  tags = ["${NOPE}"]\n}\n', "line 2: undefined variable NOPE"),
        ('target "t" {\n  tags = [for t in ["a"] : t]\n}\n', "line 2: unsupported expression"),
        ('target "t" {\n  inherits = ["_missing"]\n}\n', "unknown target '_missing'"),
        ('target "t" {\n  tags = [\n}\n', "line 3, column 1: not valid HCL"),
    ],
)
def test_bake_file_errors_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "docker-bake.hcl"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--print", "--file", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: docker-bake.hcl: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
