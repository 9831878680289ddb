"""The CUDA llm-trainer image exactly as released, built with buildah and checked on this GPU-less machine.

`make test-images-cuda`; not collected by `make test` (the file name does not start with test_): the build
downloads about 3 GB of CUDA wheels from PyPI and writes a ~6 GB image, which takes minutes (docs/images.md
has the figures). The image is docker-bake.hcl's `llm-trainer` target with its own args (CUDA torch of
requirements/torch.txt and bitsandbytes, from PyPI) and tags; the one difference from a release build is the
base: python:3.11-slim-bookworm cannot be pulled here, so the local Debian bookworm python3 stand-in replaces
it (scripts/build_local_images.py --cuda).

Everything runs in one container (with vfs storage every `podman run` copies the image's 6 GB): `pip check`
(the image has no pip: the host's pip runs on the image's interpreter), the imports, `tune --help`,
`python -m pkg.trainer --help`, a 2-process LoRA run through the image's launcher (gloo: no GPU), a QLoRA
step on bitsandbytes' CPU kernels, and the CUDA runtime the torch wheel's metadata requires, which gives
the NVIDIA driver it needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pip
import pytest

from tests.images.containers import (
    BUILD_SCRIPT,
    PODMAN,
    RUN_FLAGS,
    ContainerSetupError,
    bake_targets,
    image_size,
    require_container_tools,
)
from tests.images.full_trainer_image import ARGS, assert_trained, workspace_with_inputs

pytestmark = pytest.mark.timeout(3600)

# Minimum Linux x86_64 driver of each CUDA runtime (major.minor), from the table "CUDA Toolkit and Minimum
# Required Driver Version" of NVIDIA's CUDA release notes. The wheel's metadata says which runtime torch
# needs; a torch pin on a runtime missing here fails the test until its row is added.
MIN_DRIVER = {"12.6": "560.28.03", "12.8": "570.26", "12.9": "575.51.03", "13.0": "580.65.06"}
TRACKERS = ("tensorboard", "mlflow", "wandb")
PROBE = f"""
import importlib, importlib.metadata as md, importlib.util, json, re
versions = {{n: importlib.import_module(n).__version__
            for n in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")}}
trackers = {{n: importlib.import_module(n).__version__ for n in {TRACKERS!r} if importlib.util.find_spec(n)}}
import torch
cuda = [r for r in md.requires("torch") if re.match(r"(cuda-toolkit|nvidia-cuda-runtime)\\b", r)]
json.dump({{"versions": versions, "trackers": trackers, "torch_cuda": torch.version.cuda,
           "cuda_requires": cuda, "cuda_available": torch.cuda.is_available()}},
          open("/workspace/probe.json", "w"), indent=1)
"""
TRAIN = " ".join(ARGS)
QLORA = "--method=qlora --max-steps=2 --global-batch-size=2 --micro-batch-size=2 --max-seq-length=64"
CHECKS = f"""
cd /app
step() {{ name=$1; shift; start=$(date +%s); "$@" > "/workspace/$name.log" 2>&1; rc=$?;
         echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" >> /workspace/checks.txt; }}
step pip_check env PYTHONPATH=/opt/hostpip python -m pip check
step imports python /workspace/probe.py
step tune_help tune --help
step trainer_help python -m pkg.trainer --help
step lora_2proc python -m pkg.trainer.launch --nproc-per-node 2 {TRAIN}
step qlora_cpu python -m pkg.trainer.launch --nproc-per-node 1 {QLORA} --output-dir=/workspace/qlora
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build (or find up to date) the release llm-trainer; its tag, build seconds and size."""
    require_container_tools()
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with open(log, "w") as out:
        cmd = [sys.executable, str(BUILD_SCRIPT), "--cuda", "llm-trainer"]
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise ContainerSetupError(f"image build failed (full log: {log}):\n{tail}")
    tag = bake_targets()["llm-trainer"]["tags"][0]
    rebuilt = "built llm-trainer in" in log.read_text()
    return {
        "tag": tag,
        "build_s": round(seconds),
        "rebuilt": rebuilt,
        "size_mb": round(image_size(tag) / 1e6),
    }


def test_release_image_on_cpu(built: dict, tmp_path: Path) -> None:
    workspace = workspace_with_inputs(tmp_path / "workspace")
    (workspace / "probe.py").write_text(PROBE)
    (workspace / "checks.sh").write_text(CHECKS)
    host_pip = Path(pip.__file__).parent
    cmd = [*PODMAN, "run", *RUN_FLAGS, "--shm-size", "256m", "--volume", f"{workspace}:/workspace"]
    cmd += ["--volume", f"{host_pip}:/opt/hostpip/pip:ro", "--entrypoint", "bash", built["tag"]]
    started = time.monotonic()
    result = subprocess.run([*cmd, "/workspace/checks.sh"], capture_output=True, text=True, timeout=3000)
    container_s = round(time.monotonic() - started)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    checks = {}
    for line in (workspace / "checks.txt").read_text().splitlines():
        name, rc, seconds = re.fullmatch(r"(\S+) rc=(\d+) seconds=(\d+)", line).groups()
        checks[name] = {"rc": int(rc), "seconds": int(seconds)}
    failed = {n: (workspace / f"{n}.log").read_text()[-3000:] for n, c in checks.items() if c["rc"]}
    assert not failed, failed
    assert "No broken requirements found" in (workspace / "pip_check.log").read_text()
    assert "tune run" in (workspace / "tune_help.log").read_text()
    assert "usage: " in (workspace / "trainer_help.log").read_text()
    assert_trained(workspace)
    assert (workspace / "qlora" / "adapter" / "adapter_model.safetensors").stat().st_size > 0

    probe = json.loads((workspace / "probe.json").read_text())
    assert not probe["cuda_available"]  # this machine: the whole run was on the CPU, with gloo
    [requirement] = probe["cuda_requires"]
    runtime = re.search(r"==(\d+\.\d+)", requirement).group(1)
    assert probe["torch_cuda"] == runtime, (probe["torch_cuda"], requirement)
    assert runtime in MIN_DRIVER, f"torch needs CUDA {runtime}: add its minimum driver to MIN_DRIVER"
    report = {
        **built,
        "container_s": container_s,
        "checks": checks,
        **probe,
        "driver": f"NVIDIA driver >= {MIN_DRIVER[runtime]} (CUDA {runtime} runtime: {requirement})",
    }
    print("\ntest-images-cuda:", json.dumps(report, indent=1))
