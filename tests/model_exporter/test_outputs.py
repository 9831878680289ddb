"""What is exported (EXPORT, the default, unfinished runs), the exporter's settings, the model card, and the
file:// destination."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkg.initializers.errors import InitializerError
from pkg.model_exporter.card import describe_run, model_card
from pkg.model_exporter.config import load_export_config
from pkg.model_exporter.outputs import select

from .conftest import Exporter, one_error_line, write_run

fast = pytest.mark.fast


@fast
def test_default_is_the_model_if_the_run_wrote_one_else_the_adapter(tmp_path: Path) -> None:
    lora = write_run(tmp_path / "a")
    assert select(lora, None).what == "adapter"
    assert [f.path for f in select(lora, None).files] == ["adapter_config.json", "adapter_model.safetensors"]
    merged = write_run(tmp_path / "b", model=True)
    assert select(merged, None).what == "model"
    every = [f.path for f in select(merged, "all").files]
    assert "adapter/adapter_model.safetensors" in every and "summary.json" in every
    assert not any(p.startswith("checkpoints/") for p in every)


@fast
def test_unfinished_run_and_missing_output_are_refused(tmp_path: Path) -> None:
    out = write_run(tmp_path)
    with pytest.raises(InitializerError, match="EXPORT=model: the run wrote no model/"):
        select(out, "model")
    (out / "summary.json").unlink()
    with pytest.raises(InitializerError, match="has not finished"):
        select(out, None)


@fast
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXPORT": "weights"}, "EXPORT='weights'"),
        ({"SOURCE_PATH": "out"}, "must be an absolute path"),
        ({"ALLOW_PATTERNS": "*.json"}, "choose what to export with EXPORT"),
        ({"STORAGE_URI": "hf://org/name@refs/pr/1"}, "export to a branch"),
        ({"MODEL_REGISTRY_URL": "registry:8080"}, "must be an http(s):// URL"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(InitializerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_export_config({"STORAGE_URI": "s3://bucket/prefix", **env})


@fast
def test_model_card_names_base_model_data_method_and_losses(tmp_path: Path) -> None:
    out = write_run(tmp_path)
    run = describe_run(out, select(out, None))
    card = model_card(run, "acme/tuned")
    assert card.startswith("---\nbase_model: acme/base-1b\nlibrary_name: peft\n")
    assert "| final loss | 1.2500 |" in card and "| steps | 3 |" in card and "| method | lora |" in card


def test_export_to_a_volume_twice(export: Exporter, tmp_path: Path) -> None:
    out = write_run(tmp_path)
    dest = tmp_path / "volume" / "models" / "r1"
    env = {"STORAGE_URI": f"file://{dest}", "SOURCE_PATH": str(out)}
    done = export(**env)
    assert done.returncode == 0, done.stderr
    weights = "adapter_model.safetensors"
    assert (dest / weights).read_bytes() == (out / "adapter" / weights).read_bytes()
    manifest = json.loads((dest / ".model-exporter/manifest.json").read_text())
    assert manifest["total_files"] == 2
    again = export(**env)
    assert again.returncode == 0 and "2 already there" in again.stdout
    (out / "summary.json").unlink()
    refused = export(**env)
    assert refused.returncode == 1 and "has not finished" in one_error_line(refused.stderr)
    # The runtimes' optional step, with no destination given: nothing to do, and it says so.
    skipped = export(SOURCE_PATH=str(out), EXPORT_OPTIONAL="true")
    assert skipped.returncode == 0 and "nothing to export" in skipped.stdout
    missing = export(SOURCE_PATH=str(out))
    assert missing.returncode == 1 and "STORAGE_URI is not set" in one_error_line(missing.stderr)
