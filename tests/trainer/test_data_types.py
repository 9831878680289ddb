"""A value in a data file reaches the row checks as it was written, wherever it is in the file: never cast
to the type of the rows before it (`datasets` types a JSON file by its first 10 MiB and casts the rest)."""

from __future__ import annotations

import json

import pytest

from pkg.trainer import data_files, rows
from pkg.trainer.errors import RowError, TrainerError

GOOD = {"instruction": "i" * 500, "output": "o" * 500}  # ~1 KiB a line
TALK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def write_jsonl(path, good: dict, bad: dict, at_bytes: int) -> int:
    """`good` rows past `at_bytes`, then `bad`, then a few good rows (the bad one is not its block's
    first); returns the bad row's index."""
    line = json.dumps(good) + "\n"
    n = at_bytes // len(line) + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line * n + json.dumps(bad) + "\n" + line * 3)
    return n


@pytest.mark.fast
def test_a_list_past_the_first_10_mib_of_json_lines_is_refused_by_its_line(tmp_path):
    """The colleague's case: `datasets` read it as the string '[5]' and trained on it."""
    path = tmp_path / "d" / "train.jsonl"
    k = write_jsonl(path, GOOD, {"instruction": "x", "output": [5]}, 10 << 20)
    ds, origins = data_files.load_split(str(path.parent), str(tmp_path / ".cache"))
    assert ds[k]["output"] == [5] and ds[k + 1]["output"] == GOOD["output"]
    with pytest.raises(RowError) as exc:
        rows.prompt_and_completion(ds[k], "alpaca", k)
    assert str(origins.error(exc.value)) == f"{path} line {k + 1}: 'output' must be a string, got list"


@pytest.mark.fast
@pytest.mark.parametrize(
    "good, bad, column, expected",
    [
        (GOOD, {"instruction": "x", "output": {"a": 1}}, "output", {"a": 1}),
        (GOOD, {"instruction": "x", "output": True}, "output", True),
        (GOOD, {"instruction": "x", "output": 5}, "output", 5),  # read as "5", as in a small file
        (GOOD, {"instruction": "x", "output": None}, "output", None),
        (GOOD, {"instruction": "x"}, "output", None),  # a column missing after the first block
        (GOOD, {**GOOD, "extra": 1}, "extra", 1),  # a column new after the first block
        (
            {"messages": [*TALK, {"role": "user", "content": "p" * 900}]},
            {"messages": [{"role": "user", "content": 5}, TALK[1]]},
            "messages",
            [{"role": "user", "content": 5}, TALK[1]],
        ),
    ],
    ids=["dict", "bool", "int", "null", "missing", "extra", "messages-content"],
)
def test_a_value_of_another_kind_blocks_into_json_lines_is_kept_as_written(
    tmp_path, good, bad, column, expected
):
    """Past pyarrow's first 1 MiB block (the fast read's), so the same holds for the fallback's one piece."""
    path = tmp_path / "d" / "train.jsonl"
    k = write_jsonl(path, good, bad, 3 << 19)
    ds, origins = data_files.load_split(str(path.parent), str(tmp_path / ".cache"))
    assert ds[k][column] == expected
    assert ds[k + 1][column] == good.get(column)
    assert origins.name(k) == f"{path} line {k + 1}"


@pytest.mark.fast
def test_a_json_array_and_csv_cells_are_read_as_written(tmp_path):
    array = tmp_path / "a" / "train.json"
    array.parent.mkdir()
    array.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": [5]}]))
    assert data_files.load_rows(str(array.parent), str(tmp_path / ".cache"))[1]["output"] == [5]
    table = tmp_path / "c" / "train.csv"  # pandas' to_csv writes its index under an empty header
    table.parent.mkdir()
    cells = "0,a,1,x\n1,b,007,x\n2,c,NA,x\n3,d,5.0,x\n4,e,,x\n5,f,True,x\n"
    table.write_text("\ufeff,instruction,output,output\n" + cells)  # a byte order mark, a repeated name
    ds = data_files.load_rows(str(table.parent), str(tmp_path / ".cache"))
    assert ds["output"] == ["1", "007", "NA", "5.0", "", "True"]
    assert ds.column_names == ["Unnamed: 0", "instruction", "output", "output.1"]


@pytest.mark.fast
def test_files_of_one_split_whose_column_kinds_differ_are_refused(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    (tmp_path / "train2.jsonl").write_text(
        json.dumps({"instruction": "a", "output": "y"})
        + "\n"
        + json.dumps({"instruction": "a", "output": [5]})
    )
    with pytest.raises(TrainerError) as exc:
        data_files.load_rows(str(tmp_path), str(tmp_path / ".cache"))
    assert str(exc.value) == (
        f"{tmp_path / 'train2.jsonl'}: column 'output' holds values of several kinds but "
        f"{tmp_path / 'train.jsonl'} holds string: give a column one kind of value in every file of the split"
    )
    (tmp_path / "train2.jsonl").write_text(json.dumps({"instruction": "a", "output": 5}) + "\n")
    assert data_files.load_rows(str(tmp_path), str(tmp_path / ".cache"))["output"] == ["b", "5"]


@pytest.mark.fast
def test_rows_mixing_sharegpt_and_role_messages(tmp_path):
    """One table for both styles gives every message both styles' keys (None where absent)."""
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"messages": TALK}) + "\n" + json.dumps({"messages": sharegpt})
    )
    ds = data_files.load_rows(str(tmp_path), str(tmp_path / ".cache"))
    assert [rows.conversation(row, "messages", i) for i, row in enumerate(ds)] == [TALK, TALK]
