"""The Kubeflow runtime manifests and example TrainJobs: the fields this project relies on.

`../shared/tools/validate-runtimes manifests examples` checks them against the real v2.0.0 CRDs; this test
checks the contract with our images without that script: kinds and apiVersion, the step names and
ancestor labels the Trainer controller looks for, images that match docker-bake.hcl and the kustomization,
the shared /workspace volume, a non-root pod, and trainer arguments that pkg.trainer accepts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_DIR = ROOT / "manifests" / "runtimes"
EXAMPLES = ROOT / "examples"
API_VERSION = "trainer.kubeflow.org/v1alpha1"
ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
# Step name -> (ancestor label value, bake target of its image, entry point)
STEPS = {
    "dataset-initializer": ("dataset-initializer", "dataset-initializer"),
    "model-initializer": ("model-initializer", "model-initializer"),
    "node": ("trainer", "llm-trainer"),
    "model-exporter": (None, "model-exporter"),  # not a step the controller configures: no ancestor label
}


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def runtimes() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(RUNTIME_DIR.glob("*.yaml")):
        docs += [(path.name, doc) for doc in load_docs(path) if doc.get("kind") == "ClusterTrainingRuntime"]
    return docs


def trainjobs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        docs += [(path.name, doc) for doc in load_docs(path) if doc.get("kind") == "TrainJob"]
    return docs


def framework(runtime: dict) -> str:
    return runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"]


def jobs(runtime: dict) -> dict[str, dict]:
    return {job["name"]: job for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]}


def pod(job: dict) -> dict:
    return job["template"]["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    (only,) = pod(job)["containers"]
    return only


@pytest.fixture(scope="module")
def bake() -> dict[str, dict]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_local_images.py"), "--print"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},  # the defaults of docker-bake.hcl, not a REGISTRY/TAG of this shell
    ).stdout
    return json.loads(out)["target"]


def test_there_are_runtimes_and_examples():
    assert {name for name, _ in runtimes()} >= {"llm-lora.yaml", "llm-qlora.yaml", "llm-full.yaml"}
    assert len(trainjobs()) >= 2


@pytest.mark.parametrize(("file", "runtime"), runtimes(), ids=lambda v: v if isinstance(v, str) else "")
def test_runtime_structure(file, runtime, bake):
    assert runtime["apiVersion"] == API_VERSION
    assert runtime["metadata"]["name"] == file.removesuffix(".yaml")
    torch = runtime["spec"]["mlPolicy"]["torch"]
    assert runtime["spec"]["mlPolicy"]["numNodes"] >= 1
    assert torch["numProcPerNode"] == "auto" or int(torch["numProcPerNode"]) >= 1

    steps = jobs(runtime)
    assert list(steps) == list(STEPS), "initializers first, then node, then the exporter"
    # JobSet allows one dependsOn per step: dataset -> model -> node -> exporter, each on Complete.
    assert "dependsOn" not in steps["dataset-initializer"]
    assert steps["model-initializer"]["dependsOn"] == [{"name": "dataset-initializer", "status": "Complete"}]
    assert steps["node"]["dependsOn"] == [{"name": "model-initializer", "status": "Complete"}]
    assert steps["model-exporter"]["dependsOn"] == [{"name": "node", "status": "Complete"}]

    for name, (ancestor, target) in STEPS.items():
        job = steps[name]
        assert job["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR) == ancestor
        spec, box = pod(job), container(job)
        assert box["name"] == name, "the Trainer controller finds containers by step name"
        assert box["image"] in bake[target]["tags"], f"{name}: {box['image']} is not a docker-bake.hcl tag"
        # The shared volume at /workspace, on a PVC that every step mounts.
        mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["/workspace"] in volumes
        assert "persistentVolumeClaim" in volumes[mounts["/workspace"]]
        # Non-root, as the images are built; fsGroup makes the volume writable for uid 1000.
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 1000
        assert spec["securityContext"]["fsGroup"] == 1000
        assert box["securityContext"]["allowPrivilegeEscalation"] is False

    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for job in steps.values()
        for v in pod(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert len(claims) == 1, f"all steps must share one workspace claim, got {claims}"

    for name in ("dataset-initializer", "model-initializer"):
        env = {e["name"]: e.get("value") for e in container(steps[name]).get("env", [])}
        assert env["STORAGE_URI"].split("://")[0] in {"hf", "s3"}
        assert "command" not in container(steps[name]), "initializers run the image's own command"
    # The exporter is optional: no destination unless a TrainJob sets one; it reads the trainer's output.
    exporter = {e["name"]: e.get("value") for e in container(steps["model-exporter"])["env"]}
    assert exporter == {"EXPORT_OPTIONAL": "true", "SOURCE_PATH": "/workspace/output"}
    assert "command" not in container(steps["model-exporter"])


@pytest.mark.parametrize(
    ("file", "runtime"),
    [(f, rt) for f, rt in runtimes() if framework(rt) == "torch"],  # torchtune: test_torchtune_runtime
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_runtime_trainer_command_is_valid_config(file, runtime):
    load_config = pytest.importorskip("pkg.trainer.config").load_config
    command = container(jobs(runtime)["node"])["command"]
    # torchrun's launch (it reads the PET_* variables), with an expected error as one line
    assert command[:3] == ["python", "-m", "pkg.trainer.launch"]
    assert "args" not in container(jobs(runtime)["node"]), "TrainJob args are appended to the command"
    config = load_config(command[3:])
    assert (config.model_dir, config.dataset_dir, config.output_dir) == (
        "/workspace/model",
        "/workspace/dataset",
        "/workspace/output",
    )
    assert config.method == file.removesuffix(".yaml").removeprefix("llm-")


TORCHTUNE = {  # upstream runtime name -> the model its initializer fetches
    "torchtune-llama3.2-1b": "hf://meta-llama/Llama-3.2-1B-Instruct",
    "torchtune-llama3.2-3b": "hf://meta-llama/Llama-3.2-3B-Instruct",
    "torchtune-qwen2.5-1.5b": "hf://Qwen/Qwen2.5-1.5B-Instruct",
}
# Keys the Trainer controller keeps from the runtime's command when the SDK sends its own args
IMMUTABLE = ("output_dir", "tokenizer.path", "tokenizer.merges_file", "checkpointer.checkpoint_dir")


def test_torchtune_runtimes_have_the_upstream_names():
    names = {rt["metadata"]["name"] for _, rt in runtimes() if framework(rt) == "torchtune"}
    assert names == set(TORCHTUNE)


@pytest.mark.parametrize(
    ("file", "runtime"),
    [(f, rt) for f, rt in runtimes() if framework(rt) == "torchtune"],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_torchtune_runtime(file, runtime):
    """The upstream command shape, run as it is, and as the controller rewrites it for the SDK."""
    tune = pytest.importorskip("pkg.trainer.tune")
    name = runtime["metadata"]["name"]
    env = {e["name"]: e["value"] for e in container(jobs(runtime)["model-initializer"])["env"]}
    assert env["STORAGE_URI"] == TORCHTUNE[name]
    node = container(jobs(runtime)["node"])
    command = node["command"]
    # tune run --rdzv_endpoint=localhost:29500 RECIPE --config MODEL_full ...
    assert command[:3] == ["tune", "run", "--rdzv_endpoint=localhost:29500"]
    assert command[3] == "full_finetune_distributed" and command[4] == "--config"
    model = (
        name.split("-")[1].replace(".", "_") + "/" + name.split("-")[2].upper()
    )  # as the controller derives it
    assert command[5] == f"{model}_full"
    assert node["resources"]["limits"]["nvidia.com/gpu"] >= 1, "the controller picks the recipe from the GPUs"
    cfg, warnings = tune.translate(tune.parse_command(command[1:]), 2)
    assert (cfg.method, cfg.model_dir, cfg.output_dir) == ("full", "/workspace/model", "/workspace/output")
    assert cfg.dataset_dir == "/workspace/dataset/data" and not warnings
    # With the SDK: the controller's recipe and config, the runtime's immutable keys, then the SDK's args.
    kept = [arg for arg in command if arg.split("=")[0] in IMMUTABLE]
    sdk = ["batch_size=2", "model.lora_rank=8", "model.lora_attn_modules=[q_proj,v_proj]"]
    rewritten = ["run", "--rdzv_endpoint=job-node-0-0.job:29500", "lora_finetune_distributed", "--config",
                 f"{model}_lora", *kept, *sdk, "dataset.data_dir=/workspace/dataset/data"]  # fmt: skip
    cfg, warnings = tune.translate(tune.parse_command(rewritten), 2)
    assert (cfg.method, cfg.lora_rank, cfg.model_dir) == ("lora", 8, "/workspace/model") and not warnings


def test_kustomization_sets_every_image(bake):
    kustomization = yaml.safe_load((RUNTIME_DIR / "kustomization.yaml").read_text())
    listed = {path.name for path in RUNTIME_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == listed
    images = {entry["name"]: entry for entry in kustomization["images"]}
    used = {container(job)["image"].split(":")[0] for _, rt in runtimes() for job in jobs(rt).values()}
    assert set(images) == used
    for target in ("dataset-initializer", "model-initializer", "llm-trainer", "model-exporter"):
        repo, tag = bake[target]["tags"][0].rsplit(":", 1)
        assert images[repo]["newTag"] == tag
        assert images[repo]["newName"] == repo


@pytest.mark.parametrize(("file", "job"), trainjobs(), ids=lambda v: v if isinstance(v, str) else "")
def test_example_trainjob(file, job):
    assert job["apiVersion"] == API_VERSION
    spec = job["spec"]
    runtime_names = {rt["metadata"]["name"]: rt for _, rt in runtimes()}
    runtime = runtime_names[spec["runtimeRef"]["name"]]
    for kind in ("dataset", "model"):
        assert spec["initializer"][kind]["storageUri"].split("://")[0] in {"hf", "s3"}
    assert spec["trainer"]["numNodes"] >= 1
    # Overrides target steps that exist, and keep the volume name the runtime mounts at /workspace.
    steps = jobs(runtime)
    for override in spec.get("podSpecOverrides", []):
        assert {t["name"] for t in override["targetJobs"]} <= set(steps)
        for volume in override.get("volumes", []):
            assert volume["name"] in {v["name"] for v in pod(steps["node"])["volumes"]}
    # The example's args, appended to the runtime command, are a valid trainer configuration.
    load_config = pytest.importorskip("pkg.trainer.config").load_config
    command = container(steps["node"])["command"]
    load_config(command[3:] + spec["trainer"].get("args", []))


def test_secret_example_uses_the_initializer_variable_names():
    (secret,) = load_docs(EXAMPLES / "s3-credentials.yaml")
    assert set(secret["stringData"]) <= {"ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "ACCESS_TOKEN", "ROLE_ARN"}
