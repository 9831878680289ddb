"""The shell commands of README.md and docs/images.md (their ```bash blocks), and how the tests run them.

Every command is classified in WHO_RUNS: run by a named test, or not run here with the reason. A new
command fails tests/test_docs.py until it is classified. The `docker run` commands are run by
tests/images/test_docs_commands.py (initializers) and tests/images/full_trainer_image.py (trainer) with
podman, as written, except what `as_podman` says it changes (each change named there).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/images.md")

# Command (its start) -> who runs it. "test:" names the test that runs it; "not run:" says why it cannot.
WHO_RUNS = {
    "mkdir -p workspace && sudo chown 1000:1000 workspace": "test: tests/images/test_docs_commands.py",
    "docker run": "test: tests/images/test_docs_commands.py (initializers), full_trainer_image.py (trainer), "
    "test_model_exporter_image.py (exporter)",
    "make demo MODEL=": "not run: needs the internet (the Hub); `make demo` is that pipeline offline",
    "make demo": "test: tests/demo/test_demo.py runs the pipeline `make demo` runs, shortened",
    "make test-images-cuda": "test: it is tests/images/cuda_trainer_image.py (run here once: figures below)",
    "make test": "not run: it is the test suite itself",
    "git tag v": "not run: cuts a release (.github/workflows/release.yml runs on the pushed tag)",
    "cosign verify": "not run: needs the pushed images and the internet",
    "docker buildx imagetools": "not run: needs a registry (the pushed images)",
    "make images-local": "test: tests/images builds every image through scripts/build_local_images.py",
    "make images": "not run: needs Docker with buildx (tests/images/test_bake.py checks the bake file)",
    "make push": "not run: needs a registry to push to",
    "make lint": "not run by a test: the lead's gate runs ruff, hadolint and actionlint",
    "kubectl ": "not run: no cluster here; validate-runtimes and tests/manifests check what it applies",
    'P=""; for t in': "not run: resolves against PyPI (the internet); docs/images.md records its result",
    "PIP_CONFIG_FILE=/dev/null pip install": "not run: resolves against PyPI (the internet)",
}

# What podman needs on a stock host, as the docs say it (read from docs/images.md, so the two cannot drift).
PODMAN_FLAGS_TEXT = re.compile(r"`(--ulimit nofile=\S+ --ulimit nproc=\S+)`")


def bash_commands(path: Path) -> list[str]:
    """The commands of a file's ```bash blocks: continuation lines joined, comments and blanks dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(" ".join(command.split()))
    return commands


def who_runs(command: str) -> str | None:
    return next((who for start, who in WHO_RUNS.items() if command.startswith(start)), None)


def docker_runs(path: Path) -> list[str]:
    return [c for c in bash_commands(path) if c.startswith("docker run")]


def podman_flags() -> list[str]:
    """The flags docs/images.md tells podman users to add."""
    found = PODMAN_FLAGS_TEXT.search((ROOT / "docs/images.md").read_text())
    assert found, "docs/images.md no longer says which --ulimit flags podman needs"
    return found.group(1).split()


def as_podman(
    command: str, podman: list[str], servers: dict[str, str], env_flags: list[str], local_tags: dict[str, str]
) -> str:
    """A documented `docker run` as podman runs it here, for `bash -c` (the docs' `$PWD` and `$HF_TOKEN`
    are the shell's). What changes, and why:
    - `docker run` -> `podman <storage flags> run` + the --ulimit flags the docs give for podman;
    - `--gpus all` is left out: this machine has no GPU (the trainer must then say so in one line);
    - addresses that exist only on the reader's network (`http://minio:9000`) -> the local servers;
    - `env_flags` (e.g. `-e HF_ENDPOINT=...`: the Hub is the local test server) and host networking added;
    - image names -> the local build's tags (`local_tags`: the trainer's CPU build is `...:v2.0.0-cpu`)."""
    assert command.startswith("docker run "), command
    for documented, local in {**servers, **local_tags}.items():
        command = command.replace(documented, local)
    command = command.replace(" --gpus all", "")
    prefix = [*podman, "run", *podman_flags(), "--network", "host", *env_flags]
    return shlex.join(prefix) + command.removeprefix("docker run")
