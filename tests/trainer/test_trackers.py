"""report_to: TensorBoard event files read back with TensorBoard's own reader, a real `mlflow server`
(SQLite backend, local artifact root) holding the run, its resume and a registered version, and W&B in
offline mode read back from its run files. Never a network call beyond 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pkg.trainer import trackers
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import ConfigError
from tests.support import wandb_log
from tests.trainer.conftest import BASE_ARGS, free_port, losses, run_trainer


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One `mlflow server` for the module: SQLite backend, artifacts in a local folder, 127.0.0.1 only."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "art")]  # fmt: skip
    log = (root / "server.log").open("w")
    server = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the first start creates the database (tens of seconds on a busy machine)
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("mlflow server did not start: " + (root / "server.log").read_text()[-3000:])
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def event_scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """{tag: [(step, value)]} and {text tag: text} from TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    texts = {t: events.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in tags["tensors"]}
    return scalars, texts


def test_trackers_record_a_run_and_its_resume(tiny_model, alpaca_data, tmp_path, mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "output_dir": out,
            "report_to": "tensorboard,mlflow,wandb", "run_name": "tiny-lora", "experiment_name": "tests",
            "mlflow_register_as": "tiny-adapter", "save_every": 4}  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": mlflow_uri, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = run_trainer({**args, "max_steps": 4}, **env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_trainer({**args, "max_steps": 8}, **env)  # extends the finished run from its checkpoint
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from step 4" in second.stdout
    for result in (first, second):  # no tracker had anything to complain about
        warnings = [line for line in result.stdout.splitlines() if " WARNING " in line]
        assert not [w for w in warnings if w.split(" WARNING ")[1].startswith(trackers.TRACKERS)], warnings
    want = losses(out)
    assert len(want) == 8

    # TensorBoard: every step once (the resume purged nothing it needed), the config as text.
    scalars, texts = event_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 9))
    assert [v for _, v in scalars["loss"]] == pytest.approx(want, rel=1e-5)
    assert {"lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(scalars)
    assert "max_steps: 8" in texts["config/text_summary"]

    # MLflow: one run (the resume continued it), its params, metrics, artifacts and registered versions.
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-lora" and run.info.status == "FINISHED"
    assert run.data.params["method"] == "lora" and run.data.params["max_steps"] == "4"  # as first logged
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(1, 9))
    assert {m.step: m.value for m in history}[8] == pytest.approx(want[-1], rel=1e-5)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "loss.png", "config.yaml", "adapter"} <= artifacts
    adapter = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    versions = client.search_model_versions("name='tiny-adapter'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # one per finished attempt
    assert {v.run_id for v in versions} == {run.info.run_id}
    downloaded = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text())["steps"] == 8

    # W&B offline: both attempts wrote the same run id; their history is steps 1..8 with the same losses.
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1
    rows = [r for f in files for r in wandb_log.history(f)]
    assert [r["_step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(want, rel=1e-5)
    config = wandb_log.config(files[-1])
    assert config["max_steps"] == 8 and config["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert wandb_log.summary(files[-1])["final_loss"] == pytest.approx(want[-1], rel=1e-5)


@pytest.mark.fast
def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="report_to: neptune is not one of tensorboard, mlflow, wandb"):
        TrainConfig(report_to=["neptune"]).validate()
    with pytest.raises(ConfigError, match="mlflow_register_as needs mlflow in report_to"):
        TrainConfig(mlflow_register_as="m").validate()
    with pytest.raises(ConfigError, match="status_interval must be > 0"):
        TrainConfig(status_interval=0).validate()


def test_a_tracker_that_cannot_start(tmp_path, monkeypatch, caplog):
    """Down: one line, then without it; with report_strict: the run stops with that line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:hunter2@127.0.0.1:{free_port()}")
    (tmp_path / "tb").write_text("a file where the folder should be")
    cfg = TrainConfig(output_dir=str(tmp_path), report_to=["mlflow", "tensorboard"],
                      tensorboard_dir=str(tmp_path / "tb")).validate()  # fmt: skip
    reporters = trackers.open_reporters(cfg, 10, 0, 10, {})
    assert reporters.workers == []
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 2, lines
    assert any(line.startswith("mlflow: cannot reach http://***@127.0.0.1:") for line in lines)
    assert any(line.startswith("tensorboard: ") for line in lines)
    assert "hunter2" not in caplog.text
    cfg.report_strict = True
    with pytest.raises(ConfigError, match=r"report_to mlflow: cannot reach .* \(report_strict: true stops"):
        trackers.open_reporters(cfg, 10, 0, 10, {})
    shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)


LOGGER = "metric_logger._component_=torchtune.training.metric_logging."


@pytest.mark.fast
@pytest.mark.parametrize(
    ("args", "want"),
    [
        ([LOGGER + "MLFlowLogger", "metric_logger.experiment_name=exp", "metric_logger.run_name=r1"],
         {"report_to": ["mlflow"], "experiment_name": "exp", "run_name": "r1"}),
        ([LOGGER + "WandBLogger", "metric_logger.project=proj", "metric_logger.name=r2"],
         {"report_to": ["wandb"], "experiment_name": "proj", "run_name": "r2"}),
        ([LOGGER + "TensorBoardLogger", "metric_logger.log_dir=/tmp/tb"],
         {"report_to": ["tensorboard"], "tensorboard_dir": "/tmp/tb"}),
        ([LOGGER + "DiskLogger"], {"report_to": [], "tensorboard_dir": "", "disk_log_dir": "/tmp/o/logs"}),
    ],
)  # fmt: skip
def test_torchtune_metric_logger_maps_onto_report_to(args, want):
    from pkg.trainer import tune

    argv = ["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora", "output_dir=/tmp/o",
            "checkpointer.checkpoint_dir=/m", *args]  # fmt: skip
    cfg, _ = tune.translate(tune.parse_command(argv), 1)
    assert {k: getattr(cfg, k) for k in want} == want
    assert "--report_to" in " ".join(tune.trainer_args(cfg)) or not cfg.report_to


@pytest.mark.fast
@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("metric_logger.tracking_uri=http://x", "set MLFLOW_TRACKING_URI in the TrainJob's spec.trainer.env"),
        ("metric_logger.project=p", "MLFlowLogger does not take project"),
        ("metric_logger.run_id=abc", "continues its MLflow run by itself"),
    ],
)
def test_torchtune_metric_logger_refusals(arg, message):
    from pkg.trainer import tune

    argv = ["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora", "output_dir=/tmp/o",
            "checkpointer.checkpoint_dir=/m", LOGGER + "MLFlowLogger", arg]  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        tune.translate(tune.parse_command(argv), 1)
