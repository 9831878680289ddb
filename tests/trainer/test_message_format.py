"""message_format: instruct and chat rows in torchtune 0.6.1's model-tokenizer formats, token for token.

The expected groups below were produced once by torchtune 0.6.1's own Llama3Tokenizer / Qwen2_5Tokenizer
(tokenize_messages, and AlpacaToMessages for the alpaca row) over byte-level vocabularies (one token per
byte, so every token's text is visible), in the side venv; torchtune is not imported here. Each group is
(text, trained): consecutive tokens with the same mask, joined.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pkg.trainer import data, loss, preference, tune
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import ConfigError, TrainerError

pytestmark = pytest.mark.fast

PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request."
)
PROMPT = f"{PREAMBLE}\n\n### Instruction:\nName a color.\n\n### Response:"
ALPACA_ROW = {"instruction": "Name a color.", "input": "", "output": " Blue. "}
CHAT_ROW = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\n"},
    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]}  # fmt: skip
H, E = "<|start_header_id|>", "<|end_header_id|>\n\n"
EXPECTED = {
    ("llama3", "alpaca"): [
        (f"<|begin_of_text|>{H}user{E}{PROMPT}<|eot_id|>", False),
        (f"{H}assistant{E}Blue.<|eot_id|>", True),
        ("<|end_of_text|>", False),
    ],
    ("llama3", "messages"): [
        (f"<|begin_of_text|>{H}system{E}Be brief.<|eot_id|>{H}user{E}Hi<|eot_id|>", False),
        (f"{H}assistant{E}Hello!<|eot_id|>", True),
        (f"{H}user{E}Bye<|eot_id|>", False),
        (f"{H}assistant{E}Bye.<|eot_id|>", True),
        ("<|end_of_text|>", False),
    ],
    ("chatml", "alpaca"): [
        (f"<|im_start|>user\n{PROMPT}\n<|im_end|>\n", False),
        ("<|im_start|>assistant\n Blue. <|im_end|>", True),
    ],
    ("chatml", "messages"): [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi\n<|im_end|>\n", False),
        ("<|im_start|>assistant\nHello!<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n", False),
        ("<|im_start|>assistant\nBye.<|im_end|>", True),
    ],
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are written in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


PHI3_TOKENS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIALS = {"llama3": tune.MESSAGE_TOKENS["llama3"], "chatml": tune.MESSAGE_TOKENS["chatml"]}
BYTES = {c: b for b, c in bytes_to_unicode().items()}


def byte_tokenizer(specials: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """One token per byte (no merges), plus the family's special tokens."""
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[-1], additional_special_tokens=list(specials)
    )


def groups(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    out: list[list] = []
    for i, label in zip(ids, labels, strict=True):
        name = tokenizer.convert_ids_to_tokens(i)
        text = name if name in tokenizer.all_special_tokens else chr(BYTES[name])
        trained = label != loss.IGNORE_INDEX
        if out and out[-1][1] == trained:
            out[-1][0] += text
        else:
            out.append([text, trained])
    return [tuple(g) for g in out]


@pytest.mark.parametrize("fmt", ["llama3", "chatml"])
@pytest.mark.parametrize("rows", ["alpaca", "messages"])
def test_rows_render_as_torchtunes_tokenizer_does(fmt, rows):
    tokenizer = byte_tokenizer(SPECIALS[fmt])
    cfg = TrainConfig(message_format=fmt, alpaca_preamble=True, dataset_format=rows)
    row = ALPACA_ROW if rows == "alpaca" else CHAT_ROW
    [(ids, labels)] = data.tokenize_rows([row], rows, tokenizer, cfg)
    assert groups(tokenizer, ids, labels) == EXPECTED[fmt, rows]


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("llama3", [("<|begin_of_text|>", False),
                    (f"{H}user{E}{{p}}<|eot_id|>{H}assistant{E}5<|eot_id|>", True),
                    ("<|end_of_text|>", False)]),
        ("chatml", [("<|im_start|>user\n{p}\n<|im_end|>\n<|im_start|>assistant\n5<|im_end|>", True)]),
    ],
)  # fmt: skip
def test_train_on_input_trains_the_prompt_but_never_llama3s_bos_and_eos(fmt, expected):
    """AlpacaToMessages(train_on_input=True) on a row with an input (torchtune 0.6.1, pinned)."""
    p = ("Below is an instruction that describes a task, paired with an input that provides further "
         "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n"
         "### Input:\n2 and 3\n\n### Response:")  # fmt: skip
    tokenizer = byte_tokenizer(SPECIALS[fmt])
    cfg = TrainConfig(message_format=fmt, alpaca_preamble=True, train_on_prompt=True)
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    [(ids, labels)] = data.tokenize_non_chat_rows([row], 0, "alpaca", tokenizer, cfg)
    assert groups(tokenizer, ids, labels) == [(t.replace("{p}", p), k) for t, k in expected]


def test_a_long_row_ends_in_an_untrained_eos_as_torchtunes_truncate_does():
    """Llama3Tokenizer(max_seq_len=181) on the alpaca row of 182 tokens (torchtune 0.6.1, pinned)."""
    tokenizer = byte_tokenizer(SPECIALS["llama3"])
    cfg = TrainConfig(message_format="llama3", alpaca_preamble=True, max_seq_length=181)
    [(ids, labels)] = data.tokenize_rows([ALPACA_ROW], "alpaca", tokenizer, cfg)
    assert groups(tokenizer, ids, labels) == [
        (f"<|begin_of_text|>{H}user{E}{PROMPT}<|eot_id|>", False),
        (f"{H}assistant{E}Blue.", True),
        ("<|end_of_text|>", False),
    ]


def test_a_tokenizer_without_the_familys_tokens_is_refused_in_one_line():
    tokenizer = byte_tokenizer(SPECIALS["chatml"])
    with pytest.raises(
        TrainerError, match=r"message_format=llama3: the tokenizer has no <\|begin_of_text\|> token"
    ):
        data.tokenize_rows([ALPACA_ROW], "alpaca", tokenizer, TrainConfig(message_format="llama3"))


def test_plain_stays_the_default_and_a_familys_template_needs_its_format():
    assert TrainConfig().message_format == "plain"
    TrainConfig(objective="dpo", message_format="llama3", prompt_template="grammar").validate()
    with pytest.raises(ConfigError, match="prompt_template llama2_chat applies to a message_format other"):
        TrainConfig(prompt_template="llama2_chat").validate()
    with pytest.raises(ConfigError, match="prompt_template grammar applies to objective dpo with a message"):
        TrainConfig(objective="dpo", prompt_template="grammar").validate()


def model_folder(path, specials: tuple[str, ...]) -> str:
    """config.json, and a tokenizer.json naming `specials` (all tune run reads to choose the format)."""
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
    added = [{"id": 256 + k, "content": t, "special": True} for k, t in enumerate(specials)]
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    return str(path)


@pytest.mark.parametrize(
    "recipe, config, specials, expected",
    [
        ("lora_finetune_distributed", "llama3_2/1B_lora", SPECIALS["llama3"], "llama3"),
        ("full_finetune_distributed", "qwen2_5/0.5B_full", SPECIALS["chatml"], "chatml"),
        ("lora_finetune_distributed", "llama3_2/1B_lora", SPECIALS["chatml"], "<|begin_of_text|>"),
        ("lora_dpo_distributed", "llama3_1/8B_lora_dpo", SPECIALS["llama3"], "llama3"),
        ("lora_finetune_distributed", "llama2/7B_lora", ("<s>", "</s>"), "llama2"),
        ("lora_finetune_distributed", "mistral/7B_lora", ("<s>", "</s>"), "llama2"),
        ("lora_finetune_distributed", "gemma/2B_lora", ("<bos>", "<eos>"), "llama2"),
        ("lora_finetune_distributed", "gemma/2B_lora", ("<s>", "</s>"), "<bos>"),  # not Gemma's
        ("lora_finetune_distributed", "phi3/mini_lora", PHI3_TOKENS, "phi3"),
        ("lora_finetune_distributed", "phi4/14B_lora", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), "phi4"),
        ("lora_finetune_distributed", "phi4/14B_lora", SPECIALS["chatml"], "<|im_sep|>"),
        ("lora_dpo_distributed", "llama3_1/8B_lora_dpo", ("<s>", "</s>"), "<|begin_of_text|>"),
        ("lora_finetune_distributed", "llama3_2/1B_lora ~tokenizer._component_", ("<s>", "</s>"), "plain"),
        ("lora_dpo_distributed", "llama3_1/8B_lora_dpo ~tokenizer._component_", ("<s>", "</s>"), "plain"),
        (
            "full_finetune_distributed",
            "qwen2_5/0.5B_full tokenizer.max_seq_len=32",
            SPECIALS["chatml"],
            "chatml",
        ),
        (
            "lora_finetune_distributed",
            "llama3_2/1B_lora tokenizer.max_seq_len=32",
            SPECIALS["llama3"],
            "llama3",
        ),
    ],
)
def test_tune_run_sets_the_format_from_tokenizer_component(tmp_path, recipe, config, specials, expected):
    """A model folder whose tokenizer lacks a token the family's torchtune tokenizer writes is refused, naming
    it (torchtune writes its own ids whatever the folder holds); without tokenizer._component_: plain."""
    model = model_folder(tmp_path / "model", specials)
    config, *more = config.split()
    cmd = tune.parse_command(
        ["run", recipe, "--config", config, f"checkpointer.checkpoint_dir={model}", *more]
    )
    if expected.startswith("<"):
        component = tune.CONFIGS[config]["tokenizer._component_"]
        problem = f"tokenizer._component_={component}: the tokenizer in {model} has no {expected} token, "
        with pytest.raises(ConfigError, match=f"^{re.escape(problem)}.*~tokenizer._component_"):
            tune.translate(cmd, 1)
        return
    cfg, _ = tune.translate(cmd, 1)
    assert cfg.message_format == expected


def test_other_tokenizer_components_are_refused_and_a_folder_not_there_is_checked_as_rows_render(tmp_path):
    """torchtune 0.6.1's other tokenizers (t5, clip, llama3_2_vision's transform) render no text rows here;
    a folder without tokenizer.json (`tune validate` before the model is there) keeps the family's format,
    whose tokens the trainer checks as it renders rows."""
    model = tmp_path / "not_there_yet"
    argv = ["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora",
            f"checkpointer.checkpoint_dir={model}"]  # fmt: skip
    assert tune.translate(tune.parse_command(argv), 1)[0].message_format == "llama3"
    t5 = "torchtune.models.t5.t5_tokenizer"
    problem = rf"^tokenizer._component_={t5}: rows are rendered as torchtune 0.6.1"
    with pytest.raises(ConfigError, match=problem):
        tune.translate(tune.parse_command([*argv, f"tokenizer={t5}"]), 1)
    dpo = ["run", "lora_dpo_distributed", "--config", "llama3_1/8B_lora_dpo", "~tokenizer._component_",
           f"checkpointer.checkpoint_dir={model}",
           "tokenizer.prompt_template=torchtune.data.SummarizeTemplate"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"SummarizeTemplate: applies only to rows rendered as a torchtune"):
        tune.translate(tune.parse_command(dpo), 1)


@pytest.mark.parametrize(
    "config, template",
    [
        ("llama2/7B_lora", "llama2_chat"),  # not given: llama2_tokenizer's Llama2ChatTemplate
        ("llama2/7B_lora tokenizer.prompt_template=null", ""),
        ("mistral/7B_lora", "mistral_chat"),
        (
            "mistral/7B_lora tokenizer.prompt_template=torchtune.models.llama2.Llama2ChatTemplate",
            "llama2_chat",
        ),
        ("gemma/2B_lora", ""),
        ("phi3/mini_lora tokenizer.prompt_template=torchtune.data.SummarizeTemplate", "summarize"),
    ],
)
def test_a_missing_prompt_template_is_the_tokenizers_default_and_null_is_none(tmp_path, config, template):
    model = model_folder(tmp_path / "model", (*PHI3_TOKENS, "<bos>", "<eos>"))  # every family's here
    config, *more = config.split()
    argv = ["run", "lora_finetune_distributed", "--config", config, f"checkpointer.checkpoint_dir={model}"]
    cfg, _ = tune.translate(tune.parse_command([*argv, *more]), 1)
    assert cfg.prompt_template == template


def test_mistrals_template_with_a_system_prompt_is_refused_as_torchtune_fails_on_it(tmp_path):
    model = model_folder(tmp_path / "model", ("<s>", "</s>"))
    argv = ["run", "lora_finetune_distributed", "--config", "mistral/7B_lora",
            f"checkpointer.checkpoint_dir={model}", "dataset=torchtune.datasets.instruct_dataset",
            "dataset.source=json", "dataset.new_system_prompt=Hi"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"MistralChatTemplate .* takes no system message"):
        tune.translate(tune.parse_command(argv), 1)
    argv.append("tokenizer.prompt_template=null")
    assert tune.translate(tune.parse_command(argv), 1)[0].system_prompt == "Hi"


# ---------------------------------------------------------------- every family, against torchtune itself

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
CASES = json.loads((FIXTURES / "expected.json").read_text())


@functools.cache
def folder_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(str(FIXTURES / name))  # as the trainer loads a model folder


def case_id(case: dict) -> str:
    family = case["component"].rsplit(".", 1)[-1].removesuffix("_tokenizer")
    return f"{family}-{case['case']}-{str(case['prompt_template']).rsplit('.', 1)[-1]}"


def case_config(case: dict) -> TrainConfig:
    """The settings tune run makes of the case's tokenizer and dataset keys."""
    tt = {"tokenizer._component_": case["component"], "tokenizer.max_seq_len": case["max_seq_len"]}
    if case["prompt_template"] != "missing":  # not given: the tokenizer's default
        tt["tokenizer.prompt_template"] = case["prompt_template"]
    system = case["new_system_prompt"]
    dpo = case["format"] == "preference"
    given = {"system_prompt": system, "empty_system_prompt": system == ""} if system is not None else {}
    tokenizer = tune.tokenizer_settings(tt, str(FIXTURES / case["tokenizer"]), dpo, given)
    return TrainConfig(
        **tokenizer,
        **given,
        train_on_prompt=case["train_on_input"],
        max_seq_length=case["max_seq_len"] or 1024,
        truncation="none" if case["max_seq_len"] is None else "torchtune",
        validate_messages=not dpo,
        alpaca_preamble=True,
        add_eos=case.get("add_eos", True),
        objective="dpo" if dpo else "sft",
    ).validate()


def rendered(case: dict):
    tokenizer, cfg = folder_tokenizer(case["tokenizer"]), case_config(case)
    if case["format"] == "preference":
        [record], _, _ = preference.tokenize_pairs(datasets.Dataset.from_list([case["row"]]), tokenizer, cfg)
        return record
    [(ids, labels)] = data.tokenize_rows([case["row"]], case["format"], tokenizer, cfg)
    return ids, labels


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rows_render_as_torchtune_0_6_1_renders_them(case):
    """scripts/gen_format_fixtures.py ran torchtune's dataset transform and tokenize_messages on each row
    (text rows: text_completion_dataset), with the tokenizer files of the model folder the trainer reads."""
    if "error" in case:  # MistralChatTemplate and a system message: tune run refuses, or the row does
        problem = (
            r"MistralChatTemplate.* takes no system message"
            if "MistralChatTemplate" in case["error"]
            else r"^row 0: "  # validate_messages: our words, the same rules
        )
        with pytest.raises((ConfigError, TrainerError), match=problem):
            rendered(case)
        return
    if case["format"] != "preference":
        ids, labels = rendered(case)
        assert ids == case["tokens"]
        assert labels[1:] == case["labels"][1:]  # the first token is never a target here (packing)
        return
    record = rendered(case)
    for key in ("chosen", "rejected"):
        tokens, labels = case[key]["tokens"], case[key]["labels"]
        trained = [k for k, label in enumerate(labels) if label != loss.IGNORE_INDEX]
        start = trained[-1]  # the response: the last run of targets (the tokens after it predict none)
        while start - 1 in trained:
            start -= 1
        assert record["prompt_ids"] == tokens[:start]
        assert record[f"{key}_ids"] == tokens[start : trained[-1] + 1]
        # the prompt's targets (earlier assistant turns): the first token predicts nothing
        assert record["prompt_targets"] == [k for k in trained if 0 < k < start]


def test_a_tokenizer_json_that_always_writes_sentencepieces_leading_space_renders_the_same():
    """Hub folders converted before transformers' Metaspace (a Prepend("▁") normalizer, as Llama-2's): loaded
    as a plain PreTrainedTokenizerFast they keep it, and the ids are sentencepiece's all the same."""
    legacy = Tokenizer.from_file(str(FIXTURES / "spm" / "tokenizer.json"))
    legacy.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    legacy.pre_tokenizer = pre_tokenizers.Sequence([])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=legacy, bos_token="<s>", eos_token="</s>")
    for case in CASES:
        if case["tokenizer"] == "spm" and case["format"] == "messages" and "error" not in case:
            [(ids, _)] = data.tokenize_rows([case["row"]], "messages", tokenizer, case_config(case))
            assert ids == case["tokens"]


def test_gemma_without_tokenizer_model_refuses_only_the_rows_naming_a_piece_it_cannot_tell(tmp_path):
    """Without tokenizer.model nothing tells whether <start_of_turn> is a user-defined piece (sentencepiece
    makes it the token) or a control one (text): tokenizer.json marks both special. A row naming it is
    refused in one line; the others render as torchtune's."""
    folder = tmp_path / "gemma"
    shutil.copytree(FIXTURES / "gemma", folder, ignore=shutil.ignore_patterns("tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    gemma = {c["case"]: c for c in CASES if c["tokenizer"] == "gemma" and c["prompt_template"] == "missing"}
    turns, chat = gemma["turn_token_names"], gemma["chat"]
    with pytest.raises(TrainerError, match=r"holds <start_of_turn>, .* has no tokenizer.model to tell: add"):
        data.tokenize_rows([turns["row"]], "input_output", tokenizer, case_config(turns))
    [(ids, _)] = data.tokenize_rows([chat["row"]], "messages", tokenizer, case_config(chat))
    assert ids == chat["tokens"]


def test_tune_run_keeps_torchtunes_row_rules(tmp_path):
    """tokenizer.max_seq_len null: no truncation; set: torchtune's; new_system_prompt '': an empty system
    message; SFT conversations validated (DPO's are not, as in torchtune)."""
    model = model_folder(tmp_path / "model", SPECIALS["llama3"])
    argv = ["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora",
            f"checkpointer.checkpoint_dir={model}", "dataset=torchtune.datasets.instruct_dataset",
            "dataset.source=json", 'dataset.new_system_prompt=""']  # fmt: skip
    cfg, _ = tune.translate(tune.parse_command([*argv, "tokenizer.max_seq_len=null"]), 1)
    assert (cfg.truncation, cfg.max_seq_length, cfg.validate_messages) == ("none", 64, True)
    assert cfg.system_message() == ""
    cfg, _ = tune.translate(tune.parse_command([*argv, "tokenizer.max_seq_len=32"]), 1)
    assert (cfg.truncation, cfg.max_seq_length) == ("torchtune", 32)
    with pytest.raises(ConfigError, match=r"dataset.packed=True with tokenizer.max_seq_len null: packs need"):
        tune.translate(tune.parse_command([*argv, "tokenizer.max_seq_len=null", "dataset.packed=True"]), 1)


def test_without_truncation_a_row_longer_than_the_model_stops_the_run_naming_it():
    case = next(c for c in CASES if c["case"] == "chat" and "error" not in c)
    cfg = dataclasses.replace(case_config(case), max_seq_length=10)
    with pytest.raises(TrainerError, match=r"^row 0 is \d+ tokens, more than the model's 10 positions, and "):
        data.tokenize_rows([case["row"]], "messages", folder_tokenizer(case["tokenizer"]), cfg)
