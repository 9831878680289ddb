"""Expected failures end in one clear line and a non-zero exit, without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from tests.trainer.conftest import BASE_ARGS, run_trainer


def one_line_error(stderr: str, torchrun: bool = False) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    if torchrun:  # torchrun itself reports a failed worker with its own ChildFailedError trace
        assert "pkg/trainer/" not in stderr, stderr[-3000:]
    else:
        assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_bad_key_exits_2_in_a_fresh_process():
    result = run_trainer({"max_step": 3})
    assert result.returncode == 2
    assert "did you mean max_steps" in one_line_error(result.stderr)


def test_missing_model_files(in_process, tmp_path, alpaca_data, capsys):
    assert in_process({"model_dir": tmp_path / "nope", "dataset_dir": alpaca_data}) == 1
    assert "does not exist: run the model initializer" in one_line_error(capsys.readouterr().err)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert in_process({"model_dir": tmp_path / "m", "dataset_dir": alpaca_data}) == 1
    assert "has no *.safetensors weights" in one_line_error(capsys.readouterr().err)


def test_empty_dataset_and_missing_fields(in_process, tmp_path, tiny_model, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("")
    assert in_process({"model_dir": tiny_model, "dataset_dir": data}) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "dataset" in err and str(data) in err
    (data / "train.jsonl").write_text(
        json.dumps({"instruction": "hi", "output": "yo"}) + "\n" + json.dumps({"instruction": "x"}) + "\n"
    )
    assert in_process({"model_dir": tiny_model, "dataset_dir": data, "output_dir": tmp_path / "o2"}) == 1
    assert "row 1 has no 'output'" in one_line_error(capsys.readouterr().err)


def test_errors_under_torchrun_are_printed_once_and_no_rank_hangs(tmp_path, tiny_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": data, "output_dir": tmp_path / "out"}
    result = run_trainer(args, nproc=2, timeout=120)  # rank 0 tokenizes and fails; rank 1 must not wait
    assert result.returncode != 0
    assert "dataset_format" in result.stderr or "cannot tell the dataset format" in one_line_error(
        result.stderr
    )
    args.update(dataset_dir=tmp_path / "alpaca", global_batch_size=6, micro_batch_size=2)
    from tests.trainer.tiny import make_dataset

    make_dataset(tmp_path / "alpaca", "alpaca", "jsonl", n=24)
    result = run_trainer({**args, "output_dir": tmp_path / "out2"}, nproc=2, timeout=120)
    assert result.returncode != 0
    assert "multiple of micro_batch_size (2) x world size (2)" in one_line_error(result.stderr, torchrun=True)


def test_architectures_that_cannot_be_trained(in_process, tmp_path, tiny_model, alpaca_data, capsys):
    """No causal-LM head, a model type transformers lacks, code shipped with the model: one line each."""
    import shutil

    def model_dir(name: str, config: dict, code: bool = False) -> Path:
        path = tmp_path / name
        shutil.copytree(tiny_model, path)
        (path / "config.json").write_text(json.dumps(config))
        if code:
            (path / "modeling_mine.py").write_text("raise SystemExit('model code must never run')\n")
        return path

    def error(path: Path) -> str:
        out = tmp_path / f"out-{path.name}"  # beside the model folder, not inside it
        assert in_process({"model_dir": path, "dataset_dir": alpaca_data, "output_dir": out}) == 1
        return one_line_error(capsys.readouterr().err)

    t5 = model_dir("t5", {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    assert "a t5 model (T5ForConditionalGeneration) has no causal language-model head" in error(t5)
    auto_map = {"AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineLM"}
    remote = model_dir("remote", {"model_type": "mine", "architectures": ["MineLM"], "auto_map": auto_map})
    err = error(remote)
    assert "model type 'mine' (MineLM) is not built into transformers" in err
    assert "configuration_mine.py, modeling_mine.py not in" in err
    shipped = model_dir("shipped", {"model_type": "mine", "auto_map": auto_map}, code=True)
    assert "which the llm-trainer does not run" in error(shipped)
    unknown = model_dir("unknown", {"model_type": "nonesuch"})
    assert "names model type 'nonesuch', which transformers" in error(unknown)
