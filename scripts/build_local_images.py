#!/usr/bin/env python3
"""Build the images of docker-bake.hcl with buildah, where no Docker engine (or no registry) is at hand.

    python3 scripts/build_local_images.py                         # the bake "default" group
    python3 scripts/build_local_images.py dataset-initializer     # chosen targets
    python3 scripts/build_local_images.py --print                 # resolved targets, like `bake --print`
    python3 scripts/build_local_images.py --registry-base ...     # FROM the real bases (needs a registry)

Targets, Dockerfiles, contexts, build args, labels and tags all come from docker-bake.hcl, so this path
and `docker buildx bake` cannot drift apart. What differs, and why:

- Base images. Registry images cannot be pulled here, so BASE_IMAGE is replaced by local stand-ins:
  `localhost/kft-base-python:bookworm` (Debian bookworm minbase + python3 + python3-venv, made with
  debootstrap and cached as a tarball) for the initializers, and `localhost/kft-base-torch-cpu:<torch>`
  (the same + a venv with the CPU torch wheel) for llm-trainer, which is then built without the GPU extras
  and tagged `<tag>-cpu` so it is never mistaken for the CUDA release image.
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

ROOT = Path(__file__).resolve().parent.parent
BAKE_FILE = ROOT / "docker-bake.hcl"
CACHE = Path(os.environ.get("KFT_IMAGE_CACHE", "/var/tmp/kft-images"))
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
STORAGE = ["--storage-driver", "vfs"]

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = "python3,python3-venv,ca-certificates"
PYTHON_BASE = f"localhost/kft-base-python:{DEBIAN_SUITE}"
TORCH_VERSION = "2.13.0"
TORCH_BASE = f"localhost/kft-base-torch-cpu:{TORCH_VERSION}"
# The bake targets whose BASE_IMAGE gets a local stand-in, and the extra args of that variant.
LOCAL_VARIANTS: dict[str, dict[str, Any]] = {
    "dataset-initializer": {"base": PYTHON_BASE, "args": {}, "tag_suffix": ""},
    "model-initializer": {"base": PYTHON_BASE, "args": {}, "tag_suffix": ""},
    "llm-trainer": {"base": TORCH_BASE, "args": {"INSTALL_GPU_EXTRAS": "false"}, "tag_suffix": "-cpu"},
}
REQUIRED_TOOLS = ("buildah", "podman", "runc", "debootstrap")


class BuildError(Exception):
    """An expected failure: reported as one line, no traceback."""


# --- docker-bake.hcl ----------------------------------------------------------------------------------
# A small parser for the subset of HCL that docker-bake.hcl uses: blocks with string labels, attributes
# whose values are strings with ${VAR} interpolation, lists, maps and split(",", VAR).

_TOKEN = re.compile(
    r'\s*(?:(?P<comment>//[^\n]*|#[^\n]*|/\*.*?\*/)|(?P<string>"(?:[^"\\]|\\.)*")|(?P<ident>[A-Za-z_][\w-]*)'
    r"|(?P<punct>[{}\[\]()=,:]))",
    re.S,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            line = text.count("\n", 0, pos) + 1
            raise BuildError(f"docker-bake.hcl line {line}: cannot parse {text[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup
        if kind != "comment":
            tokens.append((kind, match.group(kind)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise BuildError(
                f"docker-bake.hcl: expected {value or 'more input'}, found {token and token[1]!r}"
            )
        self.i += 1
        return token

    def blocks(self) -> list[tuple[str, list[str], dict[str, Any]]]:
        blocks = []
        while self.peek():
            kind = self.take()[1]
            labels = []
            while self.peek() and self.peek()[0] == "string":
                labels.append(json.loads(self.take()[1]))
            blocks.append((kind, labels, self.body()))
        return blocks

    def body(self) -> dict[str, Any]:
        self.take("{")
        attrs: dict[str, Any] = {}
        while self.peek() and self.peek()[1] != "}":
            kind, key = self.take()
            self.take("=") if self.peek()[1] == "=" else self.take(":")
            attrs[json.loads(key) if kind == "string" else key] = self.value()
            if self.peek() and self.peek()[1] == ",":
                self.take(",")
        self.take("}")
        return attrs

    def value(self) -> Any:
        kind, text = self.peek()
        if kind == "string":
            self.take()
            return ("str", json.loads(text))
        if text == "[":
            self.take("[")
            items = []
            while self.peek()[1] != "]":
                items.append(self.value())
                if self.peek()[1] == ",":
                    self.take(",")
            self.take("]")
            return ("list", items)
        if text == "{":
            return ("map", self.body())
        if kind == "ident":
            self.take()
            if self.peek() and self.peek()[1] == "(":
                self.take("(")
                args = []
                while self.peek()[1] != ")":
                    args.append(self.value())
                    if self.peek()[1] == ",":
                        self.take(",")
                self.take(")")
                return ("call", text, args)
            return ("var", text)
        raise BuildError(f"docker-bake.hcl: unexpected {text!r}")


def _evaluate(node: Any, variables: dict[str, str]) -> Any:
    kind = node[0]
    if kind == "str":
        return re.sub(r"\$\{(\w+)\}", lambda m: _variable(m.group(1), variables), node[1])
    if kind == "var":
        return _variable(node[1], variables)
    if kind == "list":
        return [_evaluate(item, variables) for item in node[1]]
    if kind == "map":
        return {key: _evaluate(value, variables) for key, value in node[1].items()}
    if kind == "call" and node[1] == "split" and len(node[2]) == 2:
        separator, value = (_evaluate(arg, variables) for arg in node[2])
        return [part for part in value.split(separator) if part]
    raise BuildError(f"docker-bake.hcl: unsupported expression {node!r}; keep the file plain")


def _variable(name: str, variables: dict[str, str]) -> str:
    if name not in variables:
        raise BuildError(f"docker-bake.hcl: undefined variable {name}")
    return variables[name]


def load_bake(path: Path = BAKE_FILE, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Resolve docker-bake.hcl like `docker buildx bake --print`: {"group": {...}, "target": {...}}.

    Variables take their value from the environment when set there, as with buildx.
    """
    env = os.environ if env is None else env
    blocks = _Parser(path.read_text()).blocks()
    variables = {}
    for kind, labels, attrs in blocks:
        if kind == "variable":
            default = _evaluate(attrs.get("default", ("str", "")), {})
            variables[labels[0]] = env.get(labels[0], default)
    raw_targets = {labels[0]: attrs for kind, labels, attrs in blocks if kind == "target"}
    groups = {
        labels[0]: {"targets": _evaluate(attrs["targets"], variables)}
        for kind, labels, attrs in blocks
        if kind == "group"
    }

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name not in raw_targets:
            raise BuildError(f"docker-bake.hcl: unknown target {name!r}")
        if name in seen:
            raise BuildError(f"docker-bake.hcl: inheritance cycle through {name!r}")
        attrs = raw_targets[name]
        merged: dict[str, Any] = {}
        for parent in _evaluate(attrs.get("inherits", ("list", [])), variables):
            for key, value in resolve(parent, (*seen, name)).items():
                merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
        for key, node in attrs.items():
            if key == "inherits":
                continue
            value = _evaluate(node, variables)
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
        return merged

    targets = {name: resolve(name) for name in raw_targets if not name.startswith("_")}
    return {"group": groups, "target": targets}


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
        description = f"org.opencontainers.image.description=Debian {DEBIAN_SUITE} minbase with python3"
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
    """Debian python base + /opt/venv with the CPU torch, first on PATH (like pytorch/pytorch's conda)."""
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


def local_plan(target: dict[str, Any], name: str, registry_base: bool) -> dict[str, Any]:
    """The bake target as this script builds it: local base image and tags for the CPU variant."""
    variant = LOCAL_VARIANTS.get(name, {"base": None, "args": {}, "tag_suffix": ""})
    args = dict(target.get("args", {}))
    if not registry_base and variant["base"]:
        args["BASE_IMAGE"] = variant["base"]
        args.update(variant["args"])
        tags = [tag + variant["tag_suffix"] for tag in target.get("tags", [])]
    else:
        tags = list(target.get("tags", []))
    return {**target, "args": args, "tags": tags}


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
    # A rebuilt local base (new debootstrap, new torch) makes the images on it stale too.
    base = plan.get("args", {}).get("BASE_IMAGE")
    if base and image_exists(base):
        listing = ["buildah", *STORAGE, "images", "--quiet", "--no-trunc", base]
        digest.update(subprocess.run(listing, capture_output=True, text=True, check=False).stdout.encode())
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
    args = parser.parse_args(argv)
    try:
        env = dict(os.environ)
        if "REVISION" not in env:  # label the images with the commit, as `make images` does
            git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
            revision = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
            env["REVISION"] = revision or "unknown"
        bake = load_bake(env=env)
        names: list[str] = []
        for requested in args.targets or ["default"]:
            expanded = bake["group"].get(requested, {}).get("targets", [requested])
            for name in expanded:
                if name not in bake["target"]:
                    raise BuildError(f"unknown target {name!r}; docker-bake.hcl has {sorted(bake['target'])}")
                if name not in names:
                    names.append(name)
        if args.print:
            targets = {name: bake["target"][name] for name in names}
            print(json.dumps({"group": bake["group"], "target": targets}, indent=2))
            return 0
        plans = {name: local_plan(bake["target"][name], name, args.registry_base) for name in names}
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
