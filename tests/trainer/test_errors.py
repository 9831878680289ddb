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
    assert f"{data / 'train.jsonl'} line 2 has no 'output'" in one_line_error(capsys.readouterr().err)


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


ALPACA_OK = {"instruction": "Say hi.", "output": "Hi."}
MISSING_OUTPUT = "has no 'output' (format alpaca needs instruction, output)"


def test_a_bad_row_is_named_by_its_file_and_line(in_process, tmp_path, tiny_model, capsys):
    """The line a user opens the file at, in every file type: blank lines and a quoted newline counted,
    a pretty-printed JSON array's item where it starts, the second of several files, a slice's offset; a
    missing field, invalid messages, a field of the wrong type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = json.dumps(ALPACA_OK)
    cases = []
    jsonl = _write(tmp_path / "jsonl", "train.jsonl", f"{ok}\n\n{ok}\n" + json.dumps({"instruction": "x"}))
    cases.append(({"dataset_dir": jsonl.parent}, f"{jsonl} line 4 {MISSING_OUTPUT}"))
    array = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "output": "d"},\n'
    array = _write(tmp_path / "json", "train.json", array + '  {"instruction": "x"}\n]\n')
    cases.append(({"dataset_dir": array.parent}, f"{array} line 5 {MISSING_OUTPUT}"))
    table = _write(tmp_path / "csv", "train.csv", 'instruction,output\na,b\n"two\nlines",d\nx,\n')
    cases.append(({"dataset_dir": table.parent}, f"{table} line 5 {MISSING_OUTPUT}"))
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([ALPACA_OK] * 3), parquet / "train-00000-of-00002.parquet")
    second = parquet / "train-00001-of-00002.parquet"
    pq.write_table(pa.Table.from_pylist([ALPACA_OK, {"instruction": "x", "output": None}]), second)
    cases.append(({"dataset_dir": parquet.parent}, f"{second} row 1 (from 0) {MISSING_OUTPUT}"))
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2 + [
        {"prompt": None, "chosen": "a", "rejected": "b"}
    ]
    dpo = _write(tmp_path / "dpo", "train.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    cases.append(
        ({"dataset_dir": dpo.parent, "objective": "dpo", "dataset_split": "train[1:]"},
         f"{dpo} line 3 has no 'prompt' (preference rows need prompt/chosen/rejected strings, "),
    )  # fmt: skip
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chats = [{"messages": talk}, {"messages": talk[::-1]}]
    chat = _write(tmp_path / "chat", "train.jsonl", "".join(json.dumps(r) + "\n" for r in chats))
    cases.append(
        ({"dataset_dir": chat.parent, "validate_messages": True},
         f"{chat} line 2: message 0 is an assistant message that does not follow a user message"),
    )  # fmt: skip
    typed = [{"prompt": "a", "completion": "b"}, {"prompt": "x", "completion": [3]}]
    typed = _write(tmp_path / "typed", "train.jsonl", "".join(json.dumps(r) + "\n" for r in typed))
    cases.append(({"dataset_dir": typed.parent}, f"{typed} line 2: 'completion' must be a string, got list"))
    for k, (args, message) in enumerate(cases):
        code = in_process({"model_dir": tiny_model, "output_dir": tmp_path / f"out{k}", **args})
        assert code == 1
        assert one_line_error(capsys.readouterr().err).startswith(f"error: {message}")


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
