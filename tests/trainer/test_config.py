"""The config dataclass as YAML schema and command line: precedence, types, refusals."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pkg.trainer.config import TrainConfig, load_config, save_config, usage
from pkg.trainer.errors import ConfigError

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


def test_defaults_are_the_workspace_layout():
    cfg = load_config([])
    assert (cfg.model_dir, cfg.dataset_dir, cfg.output_dir) == (
        "/workspace/model",
        "/workspace/dataset",
        "/workspace/output",
    )
    assert cfg.method == "lora" and cfg.resume == "auto" and cfg.lora_target_modules == ["all-linear"]


def test_every_field_is_documented():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
    text = usage()
    assert "--max_steps" in text and "lora|qlora|full" in text


def test_cli_overrides_yaml_and_accepts_dashes(tmp_path):
    conf = tmp_path / "job.yaml"
    conf.write_text(
        "max_steps: 5\nlearning_rate: 1e-4\npacking: true\nlora_target_modules: [q_proj, v_proj]\n"
    )
    cfg = load_config(["--config", str(conf), "--max-steps", "20", "--micro_batch_size=4"])
    assert cfg.max_steps == 20 and cfg.micro_batch_size == 4
    assert cfg.learning_rate == 1e-4 and cfg.packing is True  # YAML reads 1e-4 as a string: converted
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = load_config(["--lora-target-modules", "q_proj,k_proj", "--packing", "--train_on_prompt", "false"])
    assert cfg.lora_target_modules == ["q_proj", "k_proj"] and cfg.packing and not cfg.train_on_prompt


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["--max_steps", "3", "--method", "full"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["method"] == "full"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max_step", "3"],
            "unknown config key 'max_step' (did you mean max_steps?); valid keys: model_dir",
        ),
        (["--method", "dpo"], "method: 'dpo' is not one of lora, qlora, full"),
        (["--lr_scheduler", "step"], "is not one of cosine, linear, constant"),
        (["--max_steps", "ten"], "max_steps: expected an integer, got 'ten'"),
        (["--packing", "maybe"], "packing: expected true or false"),
        (["--learning_rate", "0"], "learning_rate must be > 0"),
        (["--global_batch_size", "10", "--micro_batch_size", "4"], "must be a multiple of micro_batch_size"),
        (["--val_fraction", "1.5"], "val_fraction must be in [0, 1)"),
        (["--max_steps", "0", "--num_epochs", "0"], "set max_steps or num_epochs"),
        (["--method", "full", "--merge_adapter"], "merge_adapter applies to lora and qlora only"),
        (["--method", "full", "--use_dora"], "use_dora applies to lora and qlora only"),
        (["--dataset_split", "train[:x]"], "dataset_split: 'train[:x]' is not a split name"),
        (["--column_map", "[a, b]"], "column_map: expected a mapping"),
        (["--dataset_source", "xls"], "dataset_source: 'xls' is not one of auto, json"),
        (["--max_steps_per_epoch", "-1"], "max_steps_per_epoch must be >= 0"),
        (["--max_steps"], "--max_steps needs a value"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_values_are_refused_with_the_reason(argv, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml(tmp_path):
    conf = tmp_path / "bad.yaml"
    conf.write_text("max_steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", str(conf)])
    conf.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(["--config", str(conf)])
    conf.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):
        load_config(["--config", str(conf)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_docs_list_every_key():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in doc]
    assert not missing, f"docs/trainer.md lacks {missing}: regenerate its config reference"


def test_mappings_from_yaml_or_the_command_line(tmp_path):
    conf = tmp_path / "job.yaml"
    conf.write_text("column_map:\n  input: question\n")
    assert load_config(["--config", str(conf)]).column_map == {"input": "question"}
    assert load_config(["--column_map={'output': 'answer'}"]).column_map == {"output": "answer"}
    assert load_config(['--column_map={"output": "answer"}']).column_map == {"output": "answer"}
