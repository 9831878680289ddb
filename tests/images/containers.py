"""Build and run the project's images with buildah and podman, for the container tests.

    from tests.images.containers import build_images, run_container
    tags = build_images(["dataset-initializer"])          # {"dataset-initializer": "ghcr.io/...:v2.0.0"}
    result = run_container(tags["dataset-initializer"], env={...}, workspace=path)

Rootful podman with vfs storage, chroot/runc and host networking (a container reaches servers that the
tests bind to 127.0.0.1). No Docker engine needed; `scripts/install_system_deps.sh` installs the tools.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build_local_images.py"
PODMAN = [
    "podman",
    "--storage-driver",
    "vfs",
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
    "--events-backend",
    "file",
]
RUN_FLAGS = ["--rm", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class ContainerSetupError(RuntimeError):
    """This machine cannot build or run the images; the message says why and what to do."""


def require_container_tools() -> None:
    """Fail (not skip) with a clear message when images cannot be built here."""
    if os.geteuid() != 0:
        raise ContainerSetupError(
            "the container tests need root (buildah/podman with vfs storage); run `make test` as root"
        )
    if not all(shutil.which(tool) for tool in ("buildah", "podman", "runc", "debootstrap")):
        result = subprocess.run(["bash", str(ROOT / "scripts" / "install_system_deps.sh")], check=False)
        if result.returncode != 0:
            raise ContainerSetupError("could not install buildah, podman, runc, debootstrap with apt-get")


def torch_version() -> str:
    """The torch pinned in requirements/torch.txt (the tests' torch, and the llm-trainer image's)."""
    return re.search(r"^torch==(\S+)$", (ROOT / "requirements" / "torch.txt").read_text(), re.M).group(1)


def bake_targets() -> dict[str, dict]:
    """docker-bake.hcl resolved by the build script (`--print`), keyed by target name."""
    out = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--print"], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["target"]


def build_images(targets: list[str], log: Path) -> dict[str, str]:
    """Build `targets` with the local buildah path; returns the first tag of each, as built locally."""
    require_container_tools()
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), *targets], stdout=out, stderr=subprocess.STDOUT, check=False
        )
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise ContainerSetupError(f"image build failed (full log: {log}):\n{tail}")
    suffix = {"llm-trainer": "-cpu"}
    return {name: bake_targets()[name]["tags"][0] + suffix.get(name, "") for name in targets}


def run_container(
    image: str,
    *command: str,
    env: dict[str, str] | None = None,
    workspace: Path | None = None,
    timeout: float = 600,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`podman run` the image (its own CMD/ENTRYPOINT unless `command`), stdout and stderr merged."""
    cmd = [*PODMAN, "run", *RUN_FLAGS, *(extra or [])]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    if workspace is not None:
        cmd += ["--volume", f"{workspace}:/workspace"]
    cmd += [image, *command]
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False
    )


def image_config(image: str) -> dict:
    """The OCI config of a local image (User, WorkingDir, Cmd, Entrypoint, Labels, Env)."""
    out = subprocess.run(
        [*PODMAN, "image", "inspect", image], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)[0]["Config"]


def image_size(image: str) -> int:
    out = subprocess.run(
        [*PODMAN, "image", "inspect", "--format", "{{.Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip())


def make_workspace(path: Path) -> Path:
    """A host folder for /workspace, owned by the image's uid 1000 (what fsGroup gives on Kubernetes)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 1000, 1000)
    return path
