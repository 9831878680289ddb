"""The runtimes take the TrainJob status variables as the controller injects them.

Kubeflow Trainer's TrainJobStatus plugin (pkg/runtime/framework/plugins/trainjobstatus) upserts into every
container of the pod set whose ancestor label is `trainer`: three env vars, a read-only mount of the volume
`kubeflow-trainer-token` at /var/run/secrets/kubeflow/trainer, and that projected volume (a service account
token with an audience per TrainJob, plus the CA's config map). This test does the same to each runtime:
the result is still a valid runtime, nothing of ours collides with or shadows what is injected, the token is
readable by the non-root user, and the trainer's reader of those variables starts reporting.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import yaml

from pkg.trainer import trainjob_status
from tests.manifests.test_manifests import ANCESTOR, ROOT, jobs, pod, runtimes

MOUNT = "/var/run/secrets/kubeflow/trainer"
VOLUME = "kubeflow-trainer-token"
VALIDATE = ROOT.parent / "shared" / "tools" / "validate-runtimes"
VALIDATE = VALIDATE if VALIDATE.exists() else Path("/work/shared/tools/validate-runtimes")


def injected(namespace: str = "team-a", name: str = "my-job") -> tuple[list[dict], dict, dict]:
    """The env vars, the volume mount and the volume of the plugin, for TrainJob namespace/name."""
    url = (
        "https://kubeflow-trainer-controller-manager.kubeflow-system.svc:10443"
        f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"
    )
    env = [
        {"name": "KUBEFLOW_TRAINER_SERVER_URL", "value": url},
        {"name": "KUBEFLOW_TRAINER_SERVER_CA_CERT", "value": f"{MOUNT}/ca.crt"},
        {"name": "KUBEFLOW_TRAINER_SERVER_TOKEN", "value": f"{MOUNT}/token"},
    ]
    mount = {"name": VOLUME, "mountPath": MOUNT, "readOnly": True}
    audience = f"trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"
    volume = {
        "name": VOLUME,
        "projected": {
            "sources": [
                {"serviceAccountToken": {"audience": audience, "expirationSeconds": 3600, "path": "token"}},
                {"configMap": {"name": f"{name}-tls-config", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ]
        },
    }
    return env, mount, volume


def upsert(items: list[dict], item: dict, key: str = "name") -> None:
    for i, existing in enumerate(items):
        if existing[key] == item[key]:
            items[i] = item
            return
    items.append(item)


def inject(runtime: dict) -> dict:
    """The runtime as the controller runs it for a TrainJob, with the plugin's env, mount and volume."""
    env, mount, volume = injected()
    runtime = copy.deepcopy(runtime)
    labels = {name: j["template"].get("metadata", {}).get("labels", {}) for name, j in jobs(runtime).items()}
    trainers = [jobs(runtime)[name] for name, found in labels.items() if found.get(ANCESTOR) == "trainer"]
    assert len(trainers) == 1, "one pod set gets the variables: the trainer's"
    spec = pod(trainers[0])
    names = {e["name"] for e in env}
    for container in spec["containers"]:
        assert not names & {e["name"] for e in container.get("env", [])}, "ours would be overwritten"
        assert all(m["mountPath"] != MOUNT and m["name"] != VOLUME for m in container.get("volumeMounts", []))
        for item in env:
            upsert(container.setdefault("env", []), item)
        upsert(container.setdefault("volumeMounts", []), mount)
    assert VOLUME not in {v["name"] for v in spec.get("volumes", [])}
    upsert(spec.setdefault("volumes", []), volume)
    # The token is readable by the container's non-root user: the kubelet gives projected files the fsGroup.
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"] == 1000
    return runtime


def test_status_variables_reach_the_trainer(tmp_path):
    for file, runtime in runtimes():
        (tmp_path / file).write_text(yaml.safe_dump(inject(runtime), sort_keys=False))
    if VALIDATE.exists():  # the injected runtimes are still valid for the CRD (one call for all of them)
        result = subprocess.run([str(VALIDATE), str(tmp_path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{len(runtimes())} valid, 0 invalid" in result.stdout


def test_the_trainer_reads_them_as_injected(monkeypatch, tmp_path):
    """Rank 0 starts a reporter for exactly these variables (their values are file paths)."""
    env, _, _ = injected()
    for item in env:
        monkeypatch.setenv(item["name"], item["value"])
    reporter = trainjob_status.from_env(5.0, 10, 0, 10)
    assert reporter is not None
    assert reporter.url.endswith("/namespaces/team-a/trainjobs/my-job/status")
    assert reporter.token_path == Path(f"{MOUNT}/token") and reporter.ca_cert == Path(f"{MOUNT}/ca.crt")
    reporter.close()
