"""Preference data for DPO: row forms, response-only labels, prompt-first truncation, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest

from pkg.trainer import preference
from pkg.trainer.config import TrainConfig, load_config
from pkg.trainer.errors import ConfigError, TrainerError
from pkg.trainer.loss import IGNORE_INDEX
from tests.trainer.conftest import run_trainer
from tests.trainer.tiny import make_dataset, make_tokenizer, preference_rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(objective="dpo", model_dir="/models/tiny", **kw).validate()


def pairs(rows: list[dict], tokenizer, **kw):
    return preference.tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer, cfg(**kw))


@pytest.mark.fast
def test_string_rows_prompt_once_responses_with_eos_and_labels_only_on_responses(tokenizer):
    records, truncated, dropped = pairs(preference_rows("strings", 4), tokenizer)
    assert (len(records), truncated, dropped) == (4, 0, 0)
    rec = records[0]
    assert tokenizer.decode(rec["prompt_ids"]) == "<s>Repeat the word apple three times. "
    assert tokenizer.decode(rec["chosen_ids"]) == "apple apple apple</s>"
    assert tokenizer.decode(rec["rejected_ids"]).endswith("</s>") and rec["rejected_ids"] != rec["chosen_ids"]
    assert rec["seq_lens"] == [len(rec["prompt_ids"]) + len(rec[k]) for k in ("chosen_ids", "rejected_ids")]

    for shared in (True, False):
        batch = preference.collate_pairs(records[:2], shared)
        assert batch["input_ids"].shape[0] == (2 if shared else 4)  # one forward pass for both responses
        for r, (rec, key) in enumerate([(x, k) for k in ("chosen_ids", "rejected_ids") for x in records[:2]]):
            n, ids = len(rec[key]), batch["input_ids"][batch["rows"][r]]
            assert batch["targets"][r, :n].tolist() == rec[key]  # only response tokens count
            assert (batch["targets"][r, n:] == IGNORE_INDEX).all()
            # Each target is predicted from the last prompt token, then from the previous response token.
            before = ids[batch["positions"][r, :n]].tolist()
            assert before == [rec["prompt_ids"][-1], *rec[key][:-1]]
            if shared:  # rejected: positions restart after the prompt, and the chosen tokens are masked
                p, c = len(rec["prompt_ids"]), len(rec["chosen_ids"])
                at = p + (c if key == "rejected_ids" else 0)
                assert batch["position_ids"][batch["rows"][r], at : at + n].tolist() == list(range(p, p + n))
                visible = batch["attention_mask"][batch["rows"][r], 0, at + n - 1]
                assert visible[:p].all() and visible[p : p + c].all() == (key == "chosen_ids")


@pytest.mark.fast
def test_chat_rows_share_the_prompt_turns_and_render_with_the_template(tokenizer):
    implicit = preference_rows("chat", 2)
    explicit = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
        for r in implicit
    ]
    a, b = pairs(implicit, tokenizer)[0], pairs(explicit, tokenizer)[0]
    assert a == b
    assert (
        tokenizer.decode(a[0]["prompt_ids"])
        == "<s><|user|>\nRepeat the word apple three times.</s>\n<|assistant|>\n"
    )
    assert tokenizer.decode(a[0]["chosen_ids"]) == "apple apple apple</s>\n"


@pytest.mark.fast
def test_system_prompt_leads_the_prompt_of_string_and_chat_pairs_as_in_sft(tokenizer):
    (rec,) = pairs(preference_rows("strings", 1), tokenizer, system_prompt="Be brief.")[0]
    assert tokenizer.decode(rec["prompt_ids"]) == "<s>Be brief.\n\nRepeat the word apple three times. "
    assert tokenizer.decode(rec["chosen_ids"]) == "apple apple apple</s>"  # the responses are untouched

    (row,) = preference_rows("chat", 1)
    own = {"role": "system", "content": "Be verbose."}  # replaced, as in SFT
    row = {k: [own, *turns] for k, turns in row.items()}
    (rec,) = pairs([row], tokenizer, system_prompt="Be brief.")[0]
    assert tokenizer.decode(rec["prompt_ids"]) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nRepeat the word apple three times.</s>\n<|assistant|>\n"
    )
    assert tokenizer.decode(rec["chosen_ids"]) == "apple apple apple</s>\n"


@pytest.mark.fast
def test_max_seq_length_truncates_the_prompt_first_and_keeps_every_pair(tokenizer):
    rows = preference_rows("strings", 3)
    rows[1]["prompt"] = "apple river stone cloud tiger " * 20 + rows[1]["prompt"]
    rows[2]["rejected"] = "lemon " * 200
    records, truncated, empty = pairs(rows, tokenizer, max_seq_length=24)
    assert (len(records), truncated, empty) == (3, 2, 0)
    long = records[1]
    assert max(long["seq_lens"]) == 24
    assert tokenizer.decode(long["chosen_ids"]) == "river river river</s>"  # the response stays whole
    assert tokenizer.decode(long["prompt_ids"]).endswith(
        "Repeat the word river three times. "
    )  # the end stays
    # A response longer than max_seq_length - 1 loses its end; the prompt keeps its last token.
    assert len(records[2]["prompt_ids"]) == 1 and max(records[2]["seq_lens"]) == 24
    [whole], _, _ = pairs(rows[2:], tokenizer)
    assert records[2]["chosen_ids"] == whole["chosen_ids"]
    assert records[2]["rejected_ids"] == whole["rejected_ids"][:23]


@pytest.mark.fast
def test_truncation_torchtune_cuts_each_sequence_at_its_end_as_tune_run_does(tokenizer):
    rows = preference_rows("strings", 1)
    rows[0]["rejected"] = "lemon " * 200
    [whole], _, _ = pairs(rows, tokenizer)
    [rec], truncated, empty = pairs(rows, tokenizer, max_seq_length=24, truncation="torchtune")
    assert (truncated, empty, rec["prompt_ids"]) == (1, 0, whole["prompt_ids"])  # the prompt stays whole
    assert rec["chosen_ids"] == whole["chosen_ids"]
    assert rec["rejected_ids"] == whole["rejected_ids"][: 24 - len(rec["prompt_ids"])]


@pytest.mark.fast
@pytest.mark.parametrize("truncation", ["torchtune", "cut"])
def test_a_prompt_that_fills_max_seq_length_leaves_a_pair_without_response_tokens_kept(tokenizer, truncation):
    """torchtune's preference dataset keeps every row; its masked sums over no token are 0 (dpo.py)."""
    rows = preference_rows("strings", 3)
    rows[1]["prompt"] = "apple river stone cloud tiger " * 20
    records, _, empty = pairs(rows, tokenizer, max_seq_length=24, truncation=truncation)
    assert (len(records), empty) == (3, int(truncation == "torchtune"))
    if truncation == "torchtune":  # nothing to score: one prompt token goes through the model
        kept = records[1]
        assert (len(kept["prompt_ids"]), kept["chosen_ids"], kept["rejected_ids"]) == (1, [], [])
        assert (kept["prompt_targets"], kept["seq_lens"]) == ([], [1, 1])
        batch = preference.collate_pairs(records)
        assert (batch["targets"][[1, 4]] == IGNORE_INDEX).all()
    with pytest.raises(
        TrainerError, match="no preference pair has a response token within max_seq_length=24"
    ):
        pairs(rows[1:2], tokenizer, max_seq_length=24, truncation="torchtune")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"prompt": "p", "chosen": "a"}],
            "objective dpo needs preference columns but the dataset has no rejected",
        ),
        ([{"chosen": "a", "rejected": "b"}], "chosen/rejected are strings, so a 'prompt' column is needed"),
        ([{"prompt": None, "chosen": "a", "rejected": "b"}], "row 0 has no 'prompt'"),
        ([{"prompt": "p", "chosen": " ", "rejected": "b"}], "row 0: the 'chosen' response is empty"),
        (
            [
                {
                    "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
                }
            ],
            "row 0: the 'rejected' response is empty",
        ),
        (
            [
                {
                    "chosen": [{"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}],
                }
            ],
            "row 0: chosen and rejected share no prompt turn",
        ),
        (
            [{"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "b"}]}],
            "needs a string 'role'",
        ),
    ],
)
def test_bad_rows_and_columns_are_one_clear_line(tokenizer, rows, message):
    with pytest.raises(TrainerError, match=re.escape(message)) as err:
        pairs(rows, tokenizer)
    assert "\n" not in str(err.value)


def test_chat_pairs_for_a_tokenizer_without_a_chat_template_are_refused(tmp_path):
    plain = make_tokenizer(tmp_path, chat_template=False)
    with pytest.raises(
        TrainerError, match=re.escape("has no chat template: add chat_template to its tokenizer_config.json")
    ):
        pairs(preference_rows("chat", 2), plain)
    assert len(pairs(preference_rows("strings", 2), plain)[0]) == 2  # string pairs need no template


@pytest.mark.fast
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dpo_beta", "0"], "dpo_beta must be > 0"),
        (["--dpo_label_smoothing", "0.5"], r"dpo_label_smoothing must be in \[0, 0.5\)"),
        (["--dpo_loss", "ipo", "--dpo_label_smoothing", "0.1"], "applies to dpo_loss: sigmoid only"),
        (["--dpo_loss", "hinge"], "dpo_loss: 'hinge' is not one of sigmoid, ipo"),
        (["--packing", "true"], "packing applies to objective sft only"),
        (["--dataset_format", "alpaca"], "dataset_format alpaca applies to objective sft"),
    ],
)
def test_config_refuses_dpo_settings_that_cannot_work(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--objective", "dpo", *flags])


def test_an_sft_dataset_under_objective_dpo_exits_with_one_line(tmp_path, tiny_model):
    sft = make_dataset(tmp_path / "sft", "prompt_completion")
    result = run_trainer(
        {"model_dir": tiny_model, "dataset_dir": sft, "output_dir": tmp_path / "out", "objective": "dpo"},
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: objective dpo needs preference columns but the dataset has no chosen or rejected "
        "(columns: prompt, completion); expected prompt/chosen/rejected strings, or chosen/rejected message "
        "lists (with an optional prompt message list)"
    ]


@pytest.mark.fast
def test_a_family_format_pair_whose_prompt_fills_max_seq_len_is_kept_without_response_tokens():
    """tune run's llama3_tokenizer cuts each conversation at max_seq_len and ends it in an untrained EOS: a
    prompt that long leaves both responses without a target, and the pair stays (loss ln 2 in dpo.py)."""
    from transformers import AutoTokenizer

    llama3 = AutoTokenizer.from_pretrained(str(Path(__file__).parent / "fixtures" / "formats" / "llama3"))
    rows = preference_rows("chat", 2)
    for key in ("chosen", "rejected"):
        rows[0][key][0] = {"role": "user", "content": "Hello there! How are you? " * 20}
    records, truncated, empty = pairs(
        rows, llama3, message_format="llama3", truncation="torchtune", max_seq_length=64
    )
    assert (len(records), truncated, empty) == (2, 0, 1)
    assert (records[0]["chosen_ids"], records[0]["rejected_ids"], records[0]["seq_lens"]) == ([], [], [1, 1])
    assert records[1]["chosen_ids"] and records[1]["rejected_ids"]
