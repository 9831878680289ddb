#!/usr/bin/env python3
"""Build the images of docker-bake.hcl with buildah, where no Docker engine (or no registry) is at hand.

    python3 scripts/build_local_images.py                         # the bake "default" group
    python3 scripts/build_local_images.py dataset-initializer     # chosen targets
    python3 scripts/build_local_images.py --print                 # resolved targets, like `bake --print`
    python3 scripts/build_local_images.py --registry-base ...     # FROM the real bases (needs a registry)
    python3 scripts/build_local_images.py --cuda llm-trainer      # the CUDA llm-trainer, as released

Targets, Dockerfiles, contexts, build args, labels and tags all come from docker-bake.hcl, so this path
and `docker buildx bake` cannot drift apart. What differs, and why:

- Base images. Registry images cannot be pulled here, so BASE_IMAGE is replaced by local stand-ins:
  `localhost/kft-base-python:bookworm-slim` (Debian bookworm minbase + python3 + python3-venv, made with
  debootstrap, cached as a tarball, trimmed like Debian's -slim images) for initializer-base, and
  `localhost/kft-base-torch-cpu:<torch>` (the same + a venv with the CPU wheel of the torch pinned in
  requirements/torch.txt) for llm-trainer, which is then built without the GPU extras and tagged
  `<tag>-cpu` so it is never mistaken for the CUDA release image. `--cuda` builds llm-trainer as released
  instead (CUDA torch and bitsandbytes from PyPI, the release tags) on the Python stand-in: the only
  difference from the release build is then the Python base (Debian's python3 3.11 for
  python:3.11-slim-bookworm).
- A context `target:NAME` (bake builds NAME and hands it to the Dockerfile as a named context) becomes
  `--build-context KEY=container-image://TAG` of NAME built first; a target without tags is tagged
  `localhost/kft-NAME:latest`.
- pip inside the build gets the host CA bundle as the `cacert` build secret (TLS-intercepting networks).
- An image whose inputs (Dockerfile, the files it COPYs, resolved args, labels, tags, base image id) are
  unchanged is not rebuilt: their digest is kept in the label org.kubeflow.trainer.build-inputs.
  `--force` rebuilds.

Needs root, buildah, podman, runc and debootstrap (`scripts/install_system_deps.sh` installs them).
Environment: KFT_IMAGE_CACHE (default /var/tmp/kft-images) holds the base rootfs tarball;
KFT_TORCH_WHEEL points at a CPU torch wheel when `pip download torch==<version>` would not find one;
REGISTRY, TAG, PLATFORMS, REVISION override the bake variables as with buildx.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bakefile

ROOT = Path(__file__).resolve().parent.parent
BAKE_FILE = ROOT / "docker-bake.hcl"
TORCH_PIN = ROOT / "requirements" / "torch.txt"
CACHE = Path(os.environ.get("KFT_IMAGE_CACHE", "/var/tmp/kft-images"))
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
STORAGE = ["--storage-driver", "vfs"]

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
PYTHON_BASE = f"localhost/kft-base-python:{DEBIAN_SUITE}-slim"
# What Debian's own -slim images leave out (docs but their copyright files, man pages, translations), here
# and in whatever apt installs later: about 50 MB of the minbase + python3 rootfs.
SLIM_ROOTFS = r"""
cat > /etc/dpkg/dpkg.cfg.d/slim <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/man /usr/share/info -mindepth 1 -delete
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find /usr/share/doc -mindepth 1 -type d -empty -delete
"""


def torch_version(pin: Path = TORCH_PIN) -> str:
    """The one torch pin (`torch==X`) that the CPU install, the tests and the llm-trainer image all use."""
    try:
        pins = re.findall(r"^torch==(\S+)", pin.read_text(), re.M)
    except OSError as error:
        raise SystemExit(f"error: cannot read {pin}: {error.strerror}") from None
    if len(pins) != 1:
        raise SystemExit(f"error: {pin} must pin torch exactly once (torch==VERSION), found {pins}")
    return pins[0]


TORCH_VERSION = torch_version()
TORCH_BASE = f"localhost/kft-base-torch-cpu:{TORCH_VERSION}"
# The bake targets whose BASE_IMAGE gets a local stand-in, and the extra args of that variant.
LOCAL_VARIANTS: dict[str, dict[str, Any]] = {
    "initializer-base": {"base": PYTHON_BASE, "args": {}, "tag_suffix": ""},
    "llm-trainer": {"base": TORCH_BASE, "args": {"INSTALL_GPU_EXTRAS": "false"}, "tag_suffix": "-cpu"},
}
# --cuda: llm-trainer exactly as docker-bake.hcl releases it, on the Python stand-in.
CUDA_VARIANT: dict[str, Any] = {"base": PYTHON_BASE, "args": {}, "tag_suffix": ""}
REQUIRED_TOOLS = ("buildah", "podman", "runc", "debootstrap")


class BuildError(Exception):
    """An expected failure: reported as one line, no traceback."""


# --- docker-bake.hcl ----------------------------------------------------------------------------------


def load_bake(path: Path = BAKE_FILE, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Resolve docker-bake.hcl like `docker buildx bake --print`: {"group": {...}, "target": {...}}.

    Variables take their value from the environment when set there, as with buildx.
    """
    try:
        return bakefile.load(path, os.environ if env is None else env)
    except bakefile.BakeError as error:
        raise BuildError(str(error)) from None


# --- system tools and base images ----------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[images] {message}", flush=True)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    try:
        return subprocess.run(cmd, check=True, **kwargs)
    except subprocess.CalledProcessError as error:
        raise BuildError(f"command failed with exit code {error.returncode}: {' '.join(cmd)}") from None


def ensure_tools() -> None:
    """Install buildah, podman, runc and debootstrap through apt when missing (root only)."""
    if os.geteuid() != 0:
        raise BuildError(
            "building images with buildah needs root (vfs storage, chroot isolation); rerun as root "
            "or use `make images` on a machine with a Docker engine"
        )
    if all(shutil.which(tool) for tool in REQUIRED_TOOLS):
        return
    script = ROOT / "scripts" / "install_system_deps.sh"
    run(["bash", str(script)])
    missing = [tool for tool in REQUIRED_TOOLS if not shutil.which(tool)]
    if missing:
        raise BuildError(f"still missing after {script.name}: {', '.join(missing)}")


def image_exists(name: str) -> bool:
    result = subprocess.run(
        ["buildah", *STORAGE, "images", "--quiet", name], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and bool(result.stdout.strip())


def debian_rootfs() -> Path:
    """A tarball of Debian minbase with python3, built once with debootstrap and kept in CACHE."""
    key = re.sub(r"\W", "-", f"{DEBIAN_SUITE}-{DEBIAN_PACKAGES}")
    tarball = CACHE / f"rootfs-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap {DEBIAN_SUITE} into {rootfs} (about a minute, once)")
        run(
            ["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", DEBIAN_SUITE, str(rootfs)],
            stdout=subprocess.DEVNULL,
        )
        # Package caches and lists are not needed in an image.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / sub).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = tarball.with_suffix(".tar.partial")
        run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(tarball)  # complete only once fully written
    return tarball


def ensure_python_base() -> None:
    if image_exists(PYTHON_BASE):
        return
    tarball = debian_rootfs()
    container = run(["buildah", *STORAGE, "from", "scratch"], capture_output=True, text=True).stdout.strip()
    try:
        run(["buildah", *STORAGE, "add", container, str(tarball), "/"])
        run(["buildah", *STORAGE, "run", "--isolation", "chroot", container, "--", "sh", "-ec", SLIM_ROOTFS])
        description = f"org.opencontainers.image.description=Debian {DEBIAN_SUITE} slim minbase + python3"
        config = ["--env", "LANG=C.UTF-8", "--cmd", "/bin/bash", "--label", description]
        run(["buildah", *STORAGE, "config", *config, container])
        run(["buildah", *STORAGE, "commit", "--quiet", container, PYTHON_BASE], stdout=subprocess.DEVNULL)
    finally:
        subprocess.run(["buildah", *STORAGE, "rm", container], capture_output=True, check=False)


def cpu_torch_wheel(download_dir: Path) -> Path:
    """The CPU torch wheel: KFT_TORCH_WHEEL, or what the host's pip configuration finds for the pin."""
    if os.environ.get("KFT_TORCH_WHEEL"):
        wheel = Path(os.environ["KFT_TORCH_WHEEL"])
        if not wheel.is_file():
            raise BuildError(f"KFT_TORCH_WHEEL={wheel} does not exist")
        return wheel
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:"]
    run([*pip, "--dest", str(download_dir), f"torch=={TORCH_VERSION}"])
    wheels = sorted(download_dir.glob("torch-*.whl"))
    if not wheels or "+cpu" not in wheels[0].name:
        raise BuildError(
            f"no CPU wheel for torch=={TORCH_VERSION} (got {[w.name for w in wheels]}); "
            "set KFT_TORCH_WHEEL=/path/to/torch-...+cpu-...whl"
        )
    return wheels[0]


def ensure_torch_base() -> None:
    """Debian python base + /opt/venv (the venv the Dockerfile uses) with the CPU torch of the pin."""
    if image_exists(TORCH_BASE):
        return
    ensure_python_base()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = cpu_torch_wheel(Path(tmp))
        container = run(["buildah", *STORAGE, "from", PYTHON_BASE], capture_output=True, text=True).stdout
        container = container.strip()
        try:
            mounts = ["--volume", f"{wheel.parent}:/wheels:ro", "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
            options = [
                "--isolation",
                "chroot",
                "--network",
                "host",
                "--env",
                f"PIP_CERT={CA_BUNDLE}",
                *mounts,
            ]
            script = (
                "python3 -m venv /opt/venv && "
                f"/opt/venv/bin/pip install --no-cache-dir /wheels/{wheel.name} && "
                "/opt/venv/bin/python -c 'import torch; print(torch.__version__)'"
            )
            run(["buildah", *STORAGE, "run", *options, container, "--", "sh", "-ec", script])
            path = "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            config = ["--env", path, "--env", "VIRTUAL_ENV=/opt/venv"]
            run(["buildah", *STORAGE, "config", *config, container])
            run(["buildah", *STORAGE, "commit", "--quiet", container, TORCH_BASE], stdout=subprocess.DEVNULL)
        finally:
            subprocess.run(["buildah", *STORAGE, "rm", container], capture_output=True, check=False)


# --- building the bake targets --------------------------------------------------------------------------


CONTEXT_TARGET = "target:"


def build_order(targets: dict[str, dict[str, Any]], requested: list[str]) -> list[str]:
    """The requested targets and the targets their contexts name (`target:NAME`), each after those."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name not in targets:
            raise BuildError(f"unknown target {name!r}; docker-bake.hcl has {sorted(targets)}")
        if name in path:
            raise BuildError(f"docker-bake.hcl: contexts form a cycle {' -> '.join((*path, name))}")
        if name in order:
            return
        for value in targets[name].get("contexts", {}).values():
            if value.startswith(CONTEXT_TARGET):
                visit(value.removeprefix(CONTEXT_TARGET), (*path, name))
        order.append(name)

    for name in requested:
        visit(name, ())
    return order


def local_plan(
    target: dict[str, Any], name: str, registry_base: bool, built: dict[str, str], cuda: bool = False
) -> dict[str, Any]:
    """The bake target as this script builds it: local base image, tags for the CPU variant (unless
    `cuda`), and the images already built (`built`: target name -> local tag) for its `target:` contexts."""
    variant = LOCAL_VARIANTS.get(name, {"base": None, "args": {}, "tag_suffix": ""})
    if cuda and name == "llm-trainer":
        variant = CUDA_VARIANT
    args = dict(target.get("args", {}))
    tags = list(target.get("tags", [])) or [f"localhost/kft-{name}:latest"]
    if not registry_base and variant["base"]:
        args["BASE_IMAGE"] = variant["base"]
        args.update(variant["args"])
        tags = [tag + variant["tag_suffix"] for tag in tags]
    contexts = {
        key: f"container-image://{built[value.removeprefix(CONTEXT_TARGET)]}"
        if value.startswith(CONTEXT_TARGET)
        else value
        for key, value in target.get("contexts", {}).items()
    }
    plan = {**target, "args": args, "tags": tags}
    if contexts:
        plan["contexts"] = contexts
    return plan


DIGEST_LABEL = "org.kubeflow.trainer.build-inputs"


def inputs_digest(context: Path, dockerfile: Path, plan: dict[str, Any]) -> str:
    """sha256 over the Dockerfile, what its COPY instructions read, and the resolved build settings."""
    digest = hashlib.sha256(dockerfile.read_bytes())
    # The commit alone does not change what is built: a new commit with the same inputs is up to date.
    settings = {
        **plan,
        "args": {k: v for k, v in plan.get("args", {}).items() if k != "REVISION"},
        "labels": {k: v for k, v in plan.get("labels", {}).items() if not k.endswith(".revision")},
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    # A rebuilt local base (new debootstrap, new torch, new initializer-base) makes the images on it stale.
    images = [plan.get("args", {}).get("BASE_IMAGE")]
    images += [v.removeprefix("container-image://") for v in plan.get("contexts", {}).values()]
    for image in images:
        if image and image_exists(image):
            listing = ["buildah", *STORAGE, "images", "--quiet", "--no-trunc", image]
            digest.update(
                subprocess.run(listing, capture_output=True, text=True, check=False).stdout.encode()
            )
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--from") for p in parts):
            continue
        for source in (p for p in parts[1:-1] if not p.startswith("--")):
            root = context / source
            for path in sorted([root] if root.is_file() else root.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def image_label(tag: str, label: str) -> str | None:
    result = subprocess.run(
        ["buildah", *STORAGE, "inspect", "--type", "image", tag], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return None
    return (json.loads(result.stdout)["OCIv1"]["config"].get("Labels") or {}).get(label)


def build(name: str, plan: dict[str, Any], layers: bool = False, force: bool = False) -> None:
    context = ROOT / plan.get("context", ".")
    dockerfile = context / plan.get("dockerfile", "Dockerfile")
    digest = inputs_digest(context, dockerfile, plan)
    tags = plan.get("tags", [])
    if not force and tags and all(image_label(tag, DIGEST_LABEL) == digest for tag in tags):
        log(f"{name} is up to date ({tags[0]}, inputs {digest}); --force rebuilds it")
        return
    # Without --layers buildah runs every instruction in one container and commits once; with vfs (no
    # copy-on-write) each cached layer is a full copy of the root filesystem, which costs more than it saves.
    cmd = ["buildah", *STORAGE, "bud", "--isolation", "chroot", "--network", "host", f"--layers={layers}"]
    cmd += ["--secret", f"id=cacert,src={CA_BUNDLE}", "--file", str(dockerfile)]
    for key, value in plan.get("args", {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    for key, value in plan.get("contexts", {}).items():
        # An image (scheme://...) as it is; a folder relative to the repository, as bake reads it.
        cmd += ["--build-context", f"{key}={value if '://' in value else ROOT / value}"]
    for key, value in {**plan.get("labels", {}), DIGEST_LABEL: digest}.items():
        cmd += ["--label", f"{key}={value}"]
    if plan.get("target"):
        cmd += ["--target", plan["target"]]
    for tag in plan.get("tags", []):
        cmd += ["--tag", tag]
    started = time.monotonic()
    run([*cmd, str(context)])
    log(f"built {name} in {time.monotonic() - started:.0f}s: {', '.join(plan.get('tags', []))}")


def image_size(tag: str) -> int:
    """Uncompressed size in bytes, as `podman images` reports it."""
    result = subprocess.run(
        ["podman", *STORAGE, "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(result.stdout.strip() or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", help="bake targets or groups (default: the 'default' group)")
    parser.add_argument(
        "--file", "-f", type=Path, default=BAKE_FILE, help="the bake file (default: docker-bake.hcl)"
    )
    parser.add_argument(
        "--print",
        action="store_true",
        help="print the targets resolved from docker-bake.hcl as JSON and exit",
    )
    parser.add_argument(
        "--registry-base", action="store_true", help="use the BASE_IMAGE of docker-bake.hcl (pulls it)"
    )
    parser.add_argument(
        "--layers", action="store_true", help="cache each instruction as a layer (faster edits, more disk)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs did not change")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="build llm-trainer as released (CUDA torch + bitsandbytes, release tags), not the CPU variant",
    )
    args = parser.parse_args(argv)
    try:
        env = dict(os.environ)
        if "REVISION" not in env:  # label the images with the commit, as `make images` does
            git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
            revision = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
            env["REVISION"] = revision or "unknown"
        bake = load_bake(args.file, env=env)
        requested: list[str] = []
        for wanted in args.targets or ["default"]:
            for name in bake["group"].get(wanted, {}).get("targets", [wanted]):
                if name not in requested:
                    requested.append(name)
        names = build_order(bake["target"], requested)
        if args.print:  # the requested targets, then those only named as contexts, as bake prints them
            order = requested + [name for name in names if name not in requested]
            targets = {name: bake["target"][name] for name in order}
            print(json.dumps({"group": bake["group"], "target": targets}, indent=2))
            return 0
        plans: dict[str, dict[str, Any]] = {}
        for name in names:
            built = {dep: plan["tags"][0] for dep, plan in plans.items()}
            plans[name] = local_plan(bake["target"][name], name, args.registry_base, built, args.cuda)
        ensure_tools()
        if not args.registry_base:
            bases = {plan["args"].get("BASE_IMAGE") for plan in plans.values()}
            if PYTHON_BASE in bases:
                ensure_python_base()
            if TORCH_BASE in bases:
                ensure_torch_base()
        for name, plan in plans.items():
            build(name, plan, args.layers, args.force)
        # Earlier builds of the same tags are left untagged; with vfs each holds a full copy of its files.
        subprocess.run(["buildah", *STORAGE, "rmi", "--prune"], capture_output=True, check=False)
        for plan in plans.values():
            tag = plan["tags"][0]
            log(f"size {tag}: {image_size(tag) / 1e6:.0f} MB")
        return 0
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
