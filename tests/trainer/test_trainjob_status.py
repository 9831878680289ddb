"""TrainJob status: rank 0's progress reaches a real HTTPS status server (test CA, bearer token), every
payload fits the v2.3.0 TrainJob CRD and parses with the Kubeflow SDK's models, and a hostile server
(hung, refusing, 500, 403, a certificate from another CA) changes nothing in the run."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from pkg.trainer import trainjob_status
from tests.support.status_server import StatusServer
from tests.support.tls import make_certificates
from tests.trainer.conftest import BASE_ARGS, ROOT, losses, run_trainer

# The v2.3.0 TrainJob CRD in shared/ beside the repository (or the main checkout's, from a worktree).
CRD = (
    next((p for p in (ROOT.parent / "shared", Path("/work/shared")) if p.is_dir()), ROOT.parent / "shared")
    / "crds/v2.3.0/trainer.kubeflow.org_trainjobs.yaml"
)
TOKEN = "s3cr3t-projected-token"


def trainer_status_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["trainerStatus"]
    # The CEL rule `has(self.lastUpdatedTime)` is what jsonschema's `required` says.
    return {**schema, "required": ["lastUpdatedTime"]}


def check_payloads(payloads: list[dict]) -> list[int]:
    """Each payload valid for the CRD and the SDK; returns the progress percentages."""
    from kubeflow_trainer_api.models import TrainerV1alpha1UpdateTrainJobStatusRequest

    schema = trainer_status_schema()
    checker = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    progress = []
    for payload in payloads:
        assert set(payload) == {"trainerStatus"}
        checker.validate(payload["trainerStatus"])
        parsed = TrainerV1alpha1UpdateTrainJobStatusRequest.from_dict(payload).trainer_status
        assert parsed.last_updated_time is not None
        progress.append(parsed.progress_percentage)
    return progress


@pytest.fixture
def tls(tmp_path) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def reporter(env: dict[str, str], monkeypatch, total: int = 10, interval: float = 0.01):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return trainjob_status.from_env(interval, total_steps=total, start_step=0, steps_per_epoch=4)


def feed(rep, steps: int) -> None:
    for step in range(1, steps + 1):
        rep.log({"step": step, "loss": 2.0 / step, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0})
        if step == 5:
            rep.log({"step": step, "val_loss": 1.5})
        time.sleep(0.02)


def test_progress_reaches_the_server(tls, token_file, monkeypatch):
    ca, cert, key = tls
    with StatusServer(token_file).serve_tls(cert, key).start() as server:
        rep = reporter(server.env(ca, "team-a", "llm"), monkeypatch)
        feed(rep, 5)
        token_file.write_text("rotated-token")  # the kubelet rotates the projected token
        time.sleep(0.05)
        feed(rep, 10)
        rep.finish()
    progress = check_payloads(server.payloads)
    assert progress == sorted(progress) and progress[-1] == 100 and max(progress[:-1]) <= 99
    assert server.tokens[0] == TOKEN and server.tokens[-1] == "rotated-token"
    final = server.payloads[-1]["trainerStatus"]
    metrics = {m["name"]: m["value"] for m in final["metrics"]}
    assert final["estimatedRemainingSeconds"] == 0
    assert metrics["step"] == "10" and metrics["total_steps"] == "10"
    assert metrics["epoch"] == "3" and metrics["total_epochs"] == "3"  # 4 steps per epoch
    assert float(metrics["loss"]) == pytest.approx(0.2) and metrics["learning_rate"] == "0.0001"
    assert metrics["val_loss"] == "1.5"  # kept between evaluations


def test_nothing_without_the_variables(monkeypatch, caplog):
    for name in (trainjob_status.ENV_URL, trainjob_status.ENV_CA_CERT, trainjob_status.ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)
    assert trainjob_status.from_env(5.0, 10, 0, 10) is None
    monkeypatch.setenv(trainjob_status.ENV_URL, "https://127.0.0.1:1/status")
    with caplog.at_level(logging.WARNING, "pkg.trainer"):
        assert trainjob_status.from_env(5.0, 10, 0, 10) is None
    assert "KUBEFLOW_TRAINER_SERVER_CA_CERT, KUBEFLOW_TRAINER_SERVER_TOKEN not set" in caplog.text


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("hang", "did not answer within 5 s"),
        ("refused", "cannot reach"),
        ("500", "the status server failed (HTTP 500: Internal error)"),
        ("403", "the status server refused the token (HTTP 403: Forbidden)"),
        ("other-ca", "TLS with"),
    ],
)
def test_a_hostile_server_is_one_line(mode, said, tls, token_file, tmp_path, monkeypatch, caplog):
    ca, cert, key = tls
    if mode == "other-ca":  # a server whose certificate the injected CA did not sign
        _, cert, key = make_certificates(tmp_path / "other")
    server = StatusServer(token_file, mode=mode).serve_tls(cert, key).start()
    env = server.env(ca)
    if mode == "refused":
        server.stop()
        env[trainjob_status.ENV_URL] = f"https://127.0.0.1:{closed_port()}/status"
    try:
        with caplog.at_level(logging.INFO, "pkg.trainer"):
            rep = reporter(env, monkeypatch, interval=0.01)
            feed(rep, 10)
            rep.finish()
    finally:
        server.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text  # one line per kind of failure, however many updates failed
    assert said in warnings[0].getMessage()
    assert TOKEN not in caplog.text and "Traceback" not in caplog.text
    assert rep.sent == 0
    # Failures back off (0.02, 0.04 ... s): a handful of attempts, not one per step.
    assert server.attempts <= 6


def test_hostile_services_change_nothing(tiny_model, alpaca_data, tmp_path, tls, token_file):
    """A real run reports to the status server (every payload valid); the same run against a hung status
    server, an MLflow server that refuses connections and a TensorBoard folder it cannot create trains to
    the same losses, with one line per failure."""
    ca, cert, key = tls
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "status_interval": 0.01}
    with StatusServer(token_file).serve_tls(cert, key).start() as server:
        out = tmp_path / "ok"
        result = run_trainer({**args, "output_dir": out}, **server.env(ca, "ns", "job"))
    assert result.returncode == 0, result.stderr[-3000:]
    progress = check_payloads(server.payloads)
    assert progress == sorted(progress) and progress[-1] == 100
    assert len(server.payloads) >= 3
    names = {m["name"] for m in server.payloads[-1]["trainerStatus"]["metrics"]}
    assert {
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "val_loss",
        "epoch",
        "total_epochs",
    } <= names

    (tmp_path / "not-a-folder").write_text("")
    hostile = {"report_to": "mlflow,tensorboard", "tensorboard_dir": tmp_path / "not-a-folder"}
    with StatusServer(token_file, mode="hang").serve_tls(cert, key).start() as hung:
        out_hung = tmp_path / "hung"
        env = {**hung.env(ca, "ns", "job"), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
        result = run_trainer({**args, **hostile, "output_dir": out_hung}, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(out_hung) == losses(out)
    services = ("mlflow:", "tensorboard:", "TrainJob status:")  # (other libraries may warn too)
    lines = [line.split(" WARNING ", 1) for line in result.stdout.splitlines() if " WARNING " in line]
    warnings = [" WARNING ".join(w) for w in lines if w[1].startswith(services)]
    assert len(warnings) == 3, warnings  # one line per failing service
    assert "TrainJob status: " in warnings[-1] and "did not answer within 5 s" in warnings[-1]
    assert {w.split(" WARNING ")[1].split(":")[0] for w in warnings} == {
        "mlflow",
        "tensorboard",
        "TrainJob status",
    }
    assert TOKEN not in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr
    times = [json.loads((o / "summary.json").read_text())["train_time_s"] for o in (out, out_hung)]
    print("train_time_s with a working / a hung status server:", times)
