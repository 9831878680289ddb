"""Dataset files and formats, prompt masking, packing (incl. attention isolation) and the batch plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pkg.trainer import batching, chat_format, data, data_cache, data_files, rows
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError
from pkg.trainer.loss import IGNORE_INDEX
from pkg.trainer.model import load_tokenizer
from tests.trainer.conftest import ROOT
from tests.trainer.tiny import make_dataset, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_seq_length": 128, **kw}).validate()


def decode_targets(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


@pytest.mark.fast
@pytest.mark.parametrize("file_type", ["jsonl", "json", "parquet", "csv", "arrow", "hub"])
def test_every_file_layout_loads_the_train_split(tmp_path, file_type):
    make_dataset(tmp_path, "prompt_completion", file_type, n=20)
    ds = data_files.load_rows(str(tmp_path), str(tmp_path / ".cache"))
    assert len(ds) == 20  # the hub layout's test split is left out
    assert "TEST SPLIT" not in json.dumps(ds.to_list())
    assert rows.detect_format(ds.column_names, "auto") == "prompt_completion"


@pytest.mark.fast
def test_split_names_from_file_names(tmp_path):
    assert (
        data_files.split_of(tmp_path.joinpath("data/train-00000-of-00002.parquet").relative_to(tmp_path))
        == "train"
    )
    assert data_files.split_of(tmp_path.joinpath("validation.jsonl").relative_to(tmp_path)) == "validation"
    assert data_files.split_of(tmp_path.joinpath("test/part.arrow").relative_to(tmp_path)) == "test"
    assert data_files.split_of(tmp_path.joinpath("my_data.jsonl").relative_to(tmp_path)) is None


@pytest.mark.fast
def test_format_detection_and_forcing():
    assert rows.detect_format(["instruction", "input", "output"], "auto") == "alpaca"
    assert rows.detect_format(["messages", "id"], "auto") == "messages"
    assert rows.detect_format(["text"], "auto") == "text"
    with pytest.raises(TrainerError, match="cannot tell the dataset format from its columns \\(foo, bar\\)"):
        rows.detect_format(["foo", "bar"], "auto")
    with pytest.raises(TrainerError, match="dataset_format alpaca needs columns instruction, output"):
        rows.detect_format(["text"], "alpaca")


@pytest.mark.fast
def test_alpaca_masks_the_prompt_and_trains_the_answer_and_eos(tokenizer):
    ds = [
        {"instruction": "Repeat the word apple three times.", "input": "now", "output": "apple apple apple"}
    ]
    [(ids, labels)] = data.tokenize_rows(ds_of(ds), "alpaca", tokenizer, cfg())
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert decode_targets(tokenizer, ids, labels) == "apple apple apple</s>"
    assert "### Input:\nnow" in tokenizer.decode(ids)
    [(ids, labels)] = data.tokenize_rows(ds_of(ds), "alpaca", tokenizer, cfg(train_on_prompt=True))
    assert labels[1:] == ids[1:] and labels[0] == IGNORE_INDEX


@pytest.mark.fast
def test_prompt_completion_and_text(tokenizer):
    [(ids, labels)] = data.tokenize_rows(
        ds_of([{"prompt": "Say hi.", "completion": " hi"}]), "prompt_completion", tokenizer, cfg()
    )
    assert decode_targets(tokenizer, ids, labels) == " hi</s>"
    [(ids, labels)] = data.tokenize_rows(ds_of([{"text": "all of it"}]), "text", tokenizer, cfg())
    assert decode_targets(tokenizer, ids, labels) == "all of it</s>"


@pytest.mark.fast
def test_messages_train_only_assistant_turns(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Repeat apple."},
        {"role": "assistant", "content": "apple"},
        {"role": "user", "content": "Again river."},
        {"role": "assistant", "content": "river"},
    ]
    ids, labels = chat_format.tokenize_messages(tokenizer, msgs, cfg())
    assert decode_targets(tokenizer, ids, labels) == "apple</s>\nriver</s>\n"
    assert tokenizer.decode(ids).startswith("<s><|system|>\nBe brief.</s>")


def test_messages_without_a_chat_template_fall_back(tmp_path, caplog):
    tok = make_tokenizer(tmp_path, chat_template=False)
    assert not tok.chat_template
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    [(ids, labels)] = data.tokenize_rows(ds_of(rows), "messages", tok, cfg())
    assert "no chat template" in caplog.text
    assert decode_targets(tok, ids, labels) == "yo</s>\n"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("fmt", "row", "message"),
    [
        (
            "alpaca",
            {"instruction": "x", "output": None},
            "row 1 has no 'output' (format alpaca needs instruction",
        ),
        ("alpaca", {"instruction": "", "output": "y"}, "row 1 has no 'instruction'"),
        ("prompt_completion", {"prompt": "x", "completion": [3]}, "row 1: 'completion' must be a string"),
        ("messages", {"messages": [{"role": "user", "content": "x"}]}, "row 1: no 'assistant' message"),
        (
            "messages",
            {"messages": [{"role": "user"}]},
            "row 1: every message needs a string 'role' and 'content'",
        ),
        ("text", {"text": None}, "row 1 has no 'text'"),
    ],
)
def test_rows_missing_fields_are_named(tokenizer, fmt, row, message):
    good = {
        "alpaca": {"instruction": "a", "output": "b"},
        "prompt_completion": {"prompt": "a", "completion": "b"},
        "messages": {"messages": [{"role": "assistant", "content": "b"}]},
        "text": {"text": "a"},
    }[fmt]
    with pytest.raises(TrainerError, match=message.replace("(", "\\(")):
        data.tokenize_rows([good, row], fmt, tokenizer, cfg())


@pytest.mark.fast
def test_truncation_and_rows_without_targets(tmp_path, tokenizer):
    cache, tmp_path = tmp_path / "cache", tmp_path / "data"
    tmp_path.mkdir()
    rows = [{"prompt": "word " * 100, "completion": "x"}, {"prompt": "short", "completion": "answer"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = data.build_splits(cfg(dataset_dir=str(tmp_path), max_seq_length=16), tokenizer, str(cache / "c"))
    # The long prompt left no target within 16 tokens: kept (as torchtune keeps it), its first token only
    no_target, short = splits["train"]
    assert no_target == {"input_ids": no_target["input_ids"][:1], "labels": [-100], "seq_lens": [1]}
    assert batching.count_targets([short]) > 0 and len(short["input_ids"]) <= 16
    packed = data.build_splits(
        cfg(dataset_dir=str(tmp_path), max_seq_length=16, packing=True), tokenizer, str(cache / "p")
    )["train"]
    assert [r["seq_lens"] for r in packed] == [[16], [len(short["input_ids"])]]  # whole, as PackedDataset
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(TrainerError, match="no row has a target token left"):
        data.build_splits(cfg(dataset_dir=str(tmp_path), max_seq_length=16), tokenizer, str(cache / "c2"))


@pytest.mark.fast
def test_empty_and_missing_datasets(tmp_path):
    with pytest.raises(TrainerError, match="does not exist"):
        data_files.load_rows(str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(TrainerError, match="no data files"):
        data_files.load_rows(str(tmp_path), str(tmp_path))
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(TrainerError, match=r"(no rows|cannot read)"):
        data_files.load_rows(str(tmp_path), str(tmp_path / ".c"))


@pytest.mark.fast
def test_packing_keeps_samples_apart():
    samples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, 7, 8, 9])]
    packed = batching.pack(samples, max_len=6)
    assert [p["seq_lens"] for p in packed] == [[3, 2], [4]]
    batch = batching.collate(packed, pad_id=0, packing=True)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert "attention_mask" not in batch
    unpacked = batching.collate(batching.to_records(samples, False, 6), pad_id=0, packing=False)
    assert unpacked["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert set(unpacked) == {"input_ids", "labels"}  # right padding: plain causal attention suffices
    assert batching.count_targets(packed) == 6


def test_packed_logits_equal_separate_logits(tiny_model):
    """The model honours position-id boundaries: a packed sample sees nothing of its neighbour."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    a, b = [0, 17, 40, 99, 120, 5], [0, 200, 33, 7]
    batch = batching.collate(batching.pack([(a, a), (b, b)], 16), pad_id=2, packing=True)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        alone_a = model(input_ids=torch.tensor([a]), use_cache=False).logits
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits
        # Without position ids the second sample would attend to the first: the check can fail.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
    torch.testing.assert_close(packed[0, : len(a)], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, len(a) :], alone_b[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[0, len(a) :], alone_b[0], atol=1e-3)


def test_right_padding_without_a_mask_leaves_real_tokens_alone(tiny_model):
    """Unpacked batches carry no attention mask: each row's real tokens give the logits of the row alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    rows = [[0, 17, 40, 99, 120, 5], [0, 200, 33], [0, 7]]
    batch = batching.collate([{"input_ids": r, "labels": r, "seq_lens": [len(r)]} for r in rows], 2, False)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], use_cache=False).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r]), use_cache=False).logits[0]
            torch.testing.assert_close(padded[i, : len(r)], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_is_the_same_at_every_world_size(world):
    def plan(w, r):
        return batching.BatchPlan(
            num_records=50, global_batch_size=8, micro_batch_size=2, world_size=w, rank=r, seed=3
        )

    reference = plan(1, 0)
    assert reference.steps_per_epoch == 6 and reference.grad_accum == 4
    for step in (0, 5, 6, 13):
        together = [i for r in range(world) for mb in plan(world, r).micro_batches(step) for i in mb]
        assert together == reference.global_batch(step)
    epoch0 = [i for s in range(6) for i in reference.global_batch(s)]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert reference.global_batch(6) != reference.global_batch(0)  # a new order each epoch
    shares = [i for r in range(world) for mb in plan(world, r).val_batches(7) for i in mb if i >= 0]
    assert sorted(shares) == list(range(7))
    assert len({len(plan(world, r).val_batches(7)) for r in range(world)}) == 1


@pytest.mark.fast
def test_batch_plan_refusals():
    with pytest.raises(TrainerError, match=r"multiple of micro_batch_size \(2\) x world size \(3\)"):
        batching.BatchPlan(50, 8, 2, 3, 0, 0)
    with pytest.raises(TrainerError, match="only 5 training sequences, fewer than global_batch_size"):
        batching.BatchPlan(5, 8, 2, 1, 0, 0)


def ds_of(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_dataset_dict_folder_uses_its_train_split(tmp_path):
    import datasets

    from tests.trainer.tiny import rows

    splits = {"train": rows("text", 6), "test": [{"text": "TEST SPLIT"}] * 2}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(tmp_path)
    )
    ds = data_files.load_rows(str(tmp_path), str(tmp_path / ".cache"))
    assert len(ds) == 6 and "TEST SPLIT" not in json.dumps(ds.to_list())


@pytest.mark.fast
def test_micro_batches_group_similar_lengths_within_each_rank_share():
    lengths = [(i * 37) % 101 for i in range(50)]
    for world in (1, 2):
        for rank in range(world):
            plain = batching.BatchPlan(50, 8, 2, world, rank, 3)
            grouped = batching.BatchPlan(50, 8, 2, world, rank, 3, lengths=lengths)
            share = [i for mb in grouped.micro_batches(5) for i in mb]
            assert sorted(share) == sorted(i for mb in plain.micro_batches(5) for i in mb)
            assert [lengths[i] for i in share] == sorted(lengths[i] for i in share)


@pytest.mark.fast
def test_split_slices_and_named_splits(tmp_path):
    make_dataset(tmp_path, "prompt_completion", "hub", n=40)
    cache = str(tmp_path / ".cache")
    assert len(data_files.load_rows(str(tmp_path), cache, "train[:25%]")) == 10
    assert [r["prompt"] for r in data_files.load_rows(str(tmp_path), cache, "train[5:8]")] == [
        r["prompt"] for r in data_files.load_rows(str(tmp_path), cache).select(range(5, 8))
    ]
    assert len(data_files.load_rows(str(tmp_path), cache, "train[-4:]")) == 4
    assert data_files.load_rows(str(tmp_path), cache, "test")[0]["prompt"] == "TEST SPLIT"
    with pytest.raises(TrainerError, match="no validation split"):
        data_files.load_rows(str(tmp_path), cache, "validation")
    with pytest.raises(TrainerError, match=r"selects no rows"):
        data_files.load_rows(str(tmp_path), cache, "train[40:]")


def test_one_data_file_and_a_named_source(tmp_path):
    make_dataset(tmp_path / "d", "alpaca", "jsonl", n=12)
    assert len(data_files.load_rows(str(tmp_path / "d" / "train.jsonl"), str(tmp_path / ".c"))) == 12
    # .txt files are read only when dataset_source says text (a README.txt is not data by default)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("first line\nsecond line\n")
    with pytest.raises(TrainerError, match="no data files"):
        data_files.load_rows(str(tmp_path / "t"), str(tmp_path / ".c"))
    ds = data_files.load_rows(str(tmp_path / "t"), str(tmp_path / ".c"), source="text")
    assert ds["text"] == ["first line", "second line"]


@pytest.mark.fast
def test_column_map_renames_and_names_a_missing_column(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"question": "q", "answer": "a", "input": "old"}])
    renamed = rows.rename_columns(ds, {"input": "question", "output": "answer"})
    assert sorted(renamed.column_names) == ["input", "output"] and renamed[0] == {"input": "q", "output": "a"}
    assert rows.detect_format(renamed.column_names, "auto") == "input_output"
    with pytest.raises(TrainerError, match="no column 'reply'"):
        rows.rename_columns(ds, {"output": "reply"})


@pytest.mark.fast
def test_system_prompt_in_chat_and_plain_formats(tokenizer):
    msgs = [{"role": "system", "content": "old"}, {"role": "user", "content": "u"}]
    # masked: never a target, even with train_on_prompt (torchtune's new_system_prompt)
    assert rows.with_system(msgs, "new") == [{"role": "system", "content": "new", "masked": True}, msgs[1]]
    row = {"input": "Repeat the word stone.", "output": "stone stone stone"}
    assert rows.conversation(row, "input_output", 0, "Be brief.")[0]["content"] == "Be brief."
    ((ids, labels),) = data.tokenize_rows([row], "input_output", tokenizer, cfg(system_prompt="Be brief."))
    assert tokenizer.decode(ids).startswith("<s><|system|>\nBe brief.</s>\n<|user|>\nRepeat the word stone.")
    assert decode_targets(tokenizer, ids, labels).startswith("stone stone stone</s>")
    alpaca = {"instruction": "Repeat the word stone.", "input": "", "output": "stone"}
    ((ids, labels),) = data.tokenize_rows([alpaca], "alpaca", tokenizer, cfg(system_prompt="Be brief."))
    assert "Be brief.\n\n### Instruction:" in tokenizer.decode(ids)
    assert "Be brief" not in decode_targets(tokenizer, ids, labels)
    for fmt, sample in (("input_output", row), ("alpaca", alpaca)):  # training on the prompt too
        ((ids, labels),) = data.tokenize_rows(
            [sample], fmt, tokenizer, cfg(system_prompt="Be brief.", train_on_prompt=True)
        )
        assert "Repeat the word stone." in decode_targets(tokenizer, ids, labels)
        assert "Be brief" not in decode_targets(tokenizer, ids, labels)


@pytest.mark.fast
def test_max_steps_per_epoch_ends_each_epoch_early():
    capped = batching.BatchPlan(40, 4, 2, 1, 0, seed=1, max_steps_per_epoch=3)
    full = batching.BatchPlan(40, 4, 2, 1, 0, seed=1)
    assert (capped.steps_per_epoch, full.steps_per_epoch) == (3, 10)
    # epoch 1 of the capped plan starts at step 3 with epoch 1's first batch
    assert capped.global_batch(3) == full.global_batch(10) and capped.global_batch(2) == full.global_batch(2)


def test_the_cache_gives_back_its_records_and_columns_without_datasets(tmp_path):
    sft = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "seq_lens": [3]}, {"input_ids": [], "labels": [],
           "seq_lens": []}]  # fmt: skip
    pairs = [{"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4], "seq_lens": [3, 2]}]
    data_cache.write_cache({"train": sft, "val": []}, tmp_path / "sft")
    data_cache.write_cache({"train": pairs, "val": pairs}, tmp_path / "pairs")
    code = f"""
import sys
from pathlib import Path
from pkg.trainer.data_cache import read_cache
sft, pairs = read_cache(Path({str(tmp_path / "sft")!r})), read_cache(Path({str(tmp_path / "pairs")!r}))
print([list(sft["train"]), sft["val"], sft["train"]["seq_lens"], pairs["val"][-1], "datasets" in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([sft, [], [[3], []], pairs[0], False])


@pytest.mark.fast
def test_the_cache_key_follows_every_folder_by_content_not_times(tmp_path):
    folders = {name: tmp_path / name for name in ("main", "more", "val", "tokenizer")}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "train.jsonl").write_text(f'{{"text": "{name}"}}\n')
    cfg = TrainConfig(
        dataset_dir=str(folders["main"]),
        more_datasets=[{"dataset_dir": str(folders["more"])}],
        val_dataset_split="train",
        val_dataset_dir=str(folders["val"]),
    )
    key = data_cache.cache_key(cfg, str(folders["tokenizer"]))
    for folder in folders.values():
        os.utime(folder / "train.jsonl", (0, 0))  # copied or fetched again: the same data
    assert data_cache.cache_key(cfg, str(folders["tokenizer"])) == key
    for name in ("more", "val"):
        (folders[name] / "train.jsonl").write_text('{"text": "edited"}\n')
        assert data_cache.cache_key(cfg, str(folders["tokenizer"])) != key, name
        key = data_cache.cache_key(cfg, str(folders["tokenizer"]))
