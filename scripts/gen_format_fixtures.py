"""Write the reference outputs of torchtune 0.6.1's model tokenizers that tests/trainer/test_message_format.py
compares the trainer's message formats against.

    /work/venvs/torchtune/bin/pip install --no-deps transformers==5.24.0   # once: converts the tiny models
    /work/venvs/torchtune/bin/python scripts/gen_format_fixtures.py

Runs in the side venv (torchtune 0.6.1, sentencepiece); the trainer never imports torchtune. It writes
tests/trainer/fixtures/formats/:
- tiny tokenizers trained here, each a model folder as the trainer reads it (tokenizer.json and
  tokenizer_config.json, converted by transformers the way Hub folders were) plus the files torchtune reads:
  `spm` (a Llama-style SentencePiece model: byte fallback, a dummy prefix), `gemma` (no dummy prefix, the turn
  tokens as user-defined pieces), `phi3` (spm with Phi-3's special tokens), `bpe` (byte-level BPE: vocab.json
  and merges.txt, Phi-4's tokens; its merges join letters, digits and '_', which Phi4Tokenizer's word split
  keeps together),
  `qwen` and `llama3` (the same BPE with Qwen's and Llama 3's tokens and word patterns; Llama 3's also as
  a tiktoken file);
- expected.json: per case, the family, the row, the settings, and what torchtune's dataset transform and
  tokenize_messages made of them (tokens and labels, or the error torchtune raised); for text rows, what
  text_completion_dataset made of them.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torchtune.data import (
    AlpacaToMessages,
    ChosenRejectedToMessages,
    InputOutputToMessages,
    OpenAIToMessages,
    validate_messages,
)
from torchtune.datasets import TextCompletionDataset
from torchtune.models.gemma import gemma_tokenizer
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.llama3._tokenizer import CL100K_PATTERN
from torchtune.models.mistral import mistral_tokenizer
from torchtune.models.phi3 import phi3_mini_tokenizer
from torchtune.models.phi4 import phi4_tokenizer
from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX as QWEN_PATTERN
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.modules.transforms.tokenizers._gpt2 import bytes_to_unicode
from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests" / "trainer" / "fixtures" / "formats"
IGNORE = -100
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.",
    "### Instruction:", "### Input:", "### Response:", "Name a color. Blue. Add. 2 and 3 make 5.",
    "Hello there! How are you? I am fine, thank you. Be brief. Be kind. Bye. Hi",
    "Correct this to standard English: Summarize this dialogue: ---", "Corrected: Summary:",
    "[INST] <<SYS>> <</SYS>> [/INST] system user assistant", "The quick brown fox jumps over the lazy dog.",
]  # fmt: skip
CODE = ["x_1 = abc123 + x_2; def __init__(self): return snake_case_2 * 99 # it's 4567"]  # the BPE's only
GEMMA_TURNS = ["<start_of_turn>", "<end_of_turn>"]  # user-defined pieces of Gemma's SentencePiece model
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
PHI4_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"]
QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>", "<|finetune_right_pad_id|>",
                 "<|step_id|>"]  # fmt: skip


def train_spm(dummy_prefix: bool, ids: dict[str, int], pieces: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3), model_writer=buf, model_type="bpe", vocab_size=360,
        byte_fallback=True, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", character_coverage=1.0, num_threads=1, minloglevel=2,
        add_dummy_prefix=dummy_prefix, **ids, **pieces,
    )  # fmt: skip
    return buf.getvalue()


def spm_folder(name: str, model: bytes, cls, extra: list[str] = ()) -> Path:
    """tokenizer.model, and the tokenizer.json + tokenizer_config.json transformers converts it to."""
    folder = OUT / name
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model)
    tok = cls.from_pretrained(str(folder))
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    tok.save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("vocab_file", "is_local", "local_files_only"):  # this machine's paths and load options
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
    return folder


def bpe_folder() -> Path:
    """Byte-level BPE (vocab.json, merges.txt) with Phi-4's special tokens, and its tokenizer.json."""
    folder = OUT / "bpe"
    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    # trained on words split at spaces only, so the vocabulary merges letters with digits and '_' (as
    # Phi-4's, learnt on cl100k's words, merges '_' with letters): where the word splits of torchtune's
    # Phi4Tokenizer and of the folder's GPT-2 pattern differ, the ids do
    by_space = pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated")
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([by_space, to_bytes])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((CORPUS + CODE) * 3, trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pattern, as Phi-4's folder
    tok.model.save(str(folder))
    tok.add_special_tokens(PHI4_TOKENS)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
    return folder


def bpe_variant(name: str, specials: list[str], pattern: str, config: dict) -> Path:
    """The byte-level BPE of bpe_folder with another family's special tokens and word pattern (as its Hub
    folders split words: a Split on the pattern, then bytes), e.g. Qwen's or Llama 3's."""
    folder = OUT / name
    folder.mkdir(parents=True)
    for file in ("vocab.json", "merges.txt"):
        shutil.copy(OUT / "bpe" / file, folder / file)
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                         ignore_merges=name == "llama3"))  # fmt: skip
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, to_bytes])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 64}')
    return folder


def tiktoken_file(folder: Path) -> Path:
    """Llama 3's tokenizer.model: every vocabulary entry's bytes (base64) and rank (its id, the order the
    BPE learned it in)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}"
             for token, rank in sorted(vocab.items(), key=lambda kv: kv[1])]  # fmt: skip
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder / "tokenizer.model"


# ---------------------------------------------------------------- cases

ALPACA = {"instruction": "Name a color.", "input": "", "output": " Blue. "}
ALPACA_INPUT = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
INSTRUCT = {"input": " Hi there\n", "output": "Hello! "}
NAMES = {"input": "Say <s> </s> <eos> [INST] <|end|>", "output": "<|im_end|> <|eot_id|> <|im_sep|>"}
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\n"},
    {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]}  # fmt: skip
# validate_messages (SFTDataset) refuses these conversations.
INVALID = {
    "one_message": [{"role": "user", "content": "Hi"}],
    "assistant_first": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Bye"}],
    "two_user_messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Bye."}],
    "system_not_first": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be kind."},
                         {"role": "assistant", "content": "Bye."}],
}  # fmt: skip
# Gemma's turn tokens are user-defined pieces of its SentencePiece model: sentencepiece matches them in text.
TURNS = {"input": "<start_of_turn>user\nHi<end_of_turn>", "output": "<start_of_turn>model <bos> <eos>"}
# Words as torchtune's Phi4Tokenizer splits them (\w+: letters, digits and '_' together), digits, unicode
# (a combining accent, superscripts, CJK), whitespace runs and punctuation.
WORDS = {"input": "x_1 = abc123 + 4567;  it's IT'S __init__()\n\n\tna\u00efve caf\u00e9 "
                  "\u65e5\u672c \u00b2\u00b3 e\u0301",
         "output": "snake_case_2 = x_1*99!!!   done.\n"}  # fmt: skip
PAIR = {
    "chosen": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": " Bye "}],
}
# Earlier assistant turns are targets of both responses in torchtune (ChosenRejectedToMessages).
PAIR_MULTI = {key: [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                    *PAIR[key]] for key in ("chosen", "rejected")}  # fmt: skip
# (case, dataset format, row, train_on_input, new_system_prompt, max_seq_len)
CASES = [
    ("chat_empty_system_prompt", "messages", CHAT, False, "", None),
    ("chat_max_seq_len_set", "messages", CHAT, False, None, 1000),
    ("turn_token_names", "input_output", TURNS, False, None, None),
    ("word_splitting", "input_output", WORDS, False, None, None),
    *((name, "messages", {"messages": msgs}, False, None, None) for name, msgs in INVALID.items()),
    ("preference_empty_system_prompt", "preference", PAIR, False, "", None),
    ("preference_multi_turn", "preference", PAIR_MULTI, False, None, None),
    ("preference_truncated", "preference", PAIR_MULTI, False, None, 14),  # inside the earlier turn
    ("preference_truncated_response", "preference", PAIR, False, None, 24),
    ("alpaca", "alpaca", ALPACA, False, None, None),
    ("alpaca_train_on_input", "alpaca", ALPACA_INPUT, True, None, None),
    ("chat", "messages", CHAT, False, None, None),
    ("chat_train_on_input", "messages", CHAT, True, None, None),
    ("chat_system_prompt_train_on_input", "messages", CHAT, True, "Be kind.", None),
    ("instruct_system_prompt", "input_output", INSTRUCT, False, "Be kind.", None),
    ("special_token_names", "input_output", NAMES, False, None, None),
    ("chat_truncated", "messages", CHAT, False, None, 12),
    ("preference", "preference", PAIR, False, None, None),
    ("preference_system_prompt", "preference", PAIR, False, "Be kind.", None),
]
TEXT = {"text": " Hello there </s> <|eot_id|> <|im_end|>\nBye. "}
# text_completion_dataset rows: (case, row, add_eos, max_seq_len)
TEXT_CASES = [
    ("text", TEXT, True, None), ("text_no_eos", TEXT, False, None), ("text_truncated", TEXT, True, 6),
    ("text_word_splitting", {"text": WORDS["input"] + WORDS["output"]}, True, None),
]  # fmt: skip
GRAMMAR = "torchtune.data.GrammarErrorCorrectionTemplate"
MISSING = "missing"  # tokenizer.prompt_template not given: the builder's default


def messages_of(fmt: str, row: dict, train_on_input: bool, system: str | None):
    """The dataset's message transform, then SFTDataset's validate_messages (preference sets run none)."""
    row = json.loads(json.dumps(row))  # the transforms write into their rows
    if fmt != "preference":
        msgs = sft_messages(fmt, row, train_on_input, system)
        validate_messages(msgs)
        return msgs
    return ChosenRejectedToMessages(train_on_input=train_on_input, new_system_prompt=system)(row)


def sft_messages(fmt: str, row: dict, train_on_input: bool, system: str | None):
    if fmt == "alpaca":
        return AlpacaToMessages(train_on_input=train_on_input)(row)["messages"]
    if fmt == "input_output":
        return InputOutputToMessages(train_on_input=train_on_input, new_system_prompt=system)(row)["messages"]
    return OpenAIToMessages(train_on_input=train_on_input, new_system_prompt=system)(row)["messages"]


def text_row(tokenizer, row: dict, add_eos: bool) -> dict:
    """TextCompletionDataset's sample of the row (read from a file, as the builder reads its source)."""
    path = OUT / "text_row.jsonl"
    path.write_text(json.dumps(row) + "\n")
    try:
        dataset = TextCompletionDataset(tokenizer, source="json", data_files=str(path), column="text",
                                        add_eos=add_eos, split="train")  # fmt: skip
        sample = dataset[0]
    finally:
        path.unlink()
    return {"tokens": [int(t) for t in sample["tokens"]], "labels": [int(t) for t in sample["labels"]]}


def tokenized(tokenizer, msgs) -> dict:
    tokens, mask = tokenizer.tokenize_messages(msgs)
    return {"tokens": [int(t) for t in tokens], "labels": [int(x) for x in np.where(mask, IGNORE, tokens)]}


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    llama_ids = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
    spm_dir = spm_folder("spm", train_spm(True, llama_ids, {}), LlamaTokenizer)
    gemma_pieces = {"pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>",
                    "user_defined_symbols": GEMMA_TURNS}  # fmt: skip
    gemma_ids = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}
    gemma_model = train_spm(False, gemma_ids, gemma_pieces)
    gemma_dir = spm_folder("gemma", gemma_model, GemmaTokenizer, GEMMA_TURNS)  # special, as on the Hub
    phi3_dir = spm_folder("phi3", (spm_dir / "tokenizer.model").read_bytes(), LlamaTokenizer, PHI3_TOKENS)
    bpe_dir = bpe_folder()
    qwen_dir = bpe_variant("qwen", QWEN_TOKENS, QWEN_PATTERN,
                           {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>"})  # fmt: skip
    llama3_dir = bpe_variant("llama3", LLAMA3_TOKENS, CL100K_PATTERN,
                             {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                              "eos_token": "<|eot_id|>"})  # fmt: skip
    tiktoken_file(llama3_dir)
    for folder in (spm_dir, gemma_dir, phi3_dir, bpe_dir, qwen_dir, llama3_dir):
        AutoTokenizer.from_pretrained(str(folder))  # loads as the trainer loads it
    families = {  # tokenizer._component_: the model folder, the builder on the files torchtune reads
        llama3_tokenizer: (llama3_dir, lambda **kw: llama3_tokenizer(
            str(llama3_dir / "tokenizer.model"), special_tokens_path=str(llama3_dir / "tokenizer.json"),
            **kw)),
        qwen2_5_tokenizer: (qwen_dir, lambda **kw: qwen2_5_tokenizer(
            str(qwen_dir / "vocab.json"), str(qwen_dir / "merges.txt"),
            special_tokens_path=str(qwen_dir / "tokenizer.json"), **kw)),
        llama2_tokenizer: (spm_dir, lambda **kw: llama2_tokenizer(str(spm_dir / "tokenizer.model"), **kw)),
        mistral_tokenizer: (spm_dir, lambda **kw: mistral_tokenizer(str(spm_dir / "tokenizer.model"), **kw)),
        gemma_tokenizer: (gemma_dir, lambda **kw: gemma_tokenizer(str(gemma_dir / "tokenizer.model"), **kw)),
        phi3_mini_tokenizer: (phi3_dir, lambda **kw: phi3_mini_tokenizer(
            str(phi3_dir / "tokenizer.model"), special_tokens_path=str(phi3_dir / "tokenizer.json"), **kw)),
        phi4_tokenizer: (bpe_dir, lambda **kw: phi4_tokenizer(
            vocab_path=str(bpe_dir / "vocab.json"), merges_path=str(bpe_dir / "merges.txt"),
            special_tokens_path=str(bpe_dir / "tokenizer.json"), **kw)),
    }  # fmt: skip
    expected = []
    for builder, (folder, build) in families.items():
        component = f"{builder.__module__.rsplit('.', 1)[0]}.{builder.__name__}"
        for template in (MISSING, None, GRAMMAR):
            for case, fmt, row, train_on_input, system, max_len in CASES:
                if template != MISSING and case not in ("chat", "alpaca", "preference"):
                    continue  # the template's effect is seen on a few rows
                kw = {"max_seq_len": max_len}
                if template != MISSING:
                    kw["prompt_template"] = template
                entry = {"component": component, "tokenizer": folder.name, "case": case, "format": fmt,
                         "row": row, "train_on_input": train_on_input, "new_system_prompt": system,
                         "max_seq_len": max_len, "prompt_template": template}  # fmt: skip
                try:
                    tokenizer = build(**kw)
                    msgs = messages_of(fmt, row, train_on_input, system)
                    if fmt == "preference":
                        entry["chosen"] = tokenized(tokenizer, msgs["chosen"])
                        entry["rejected"] = tokenized(tokenizer, msgs["rejected"])
                    else:
                        entry.update(tokenized(tokenizer, msgs))
                except ValueError as exc:  # validate_messages; MistralChatTemplate and a system message
                    entry["error"] = str(exc)
                expected.append(entry)
        for case, row, add_eos, max_len in TEXT_CASES:
            entry = {"component": component, "tokenizer": folder.name, "case": case, "format": "text",
                     "row": row, "add_eos": add_eos, "train_on_input": False, "new_system_prompt": None,
                     "max_seq_len": max_len, "prompt_template": MISSING}  # fmt: skip
            entry.update(text_row(build(max_seq_len=max_len), row, add_eos))
            expected.append(entry)
    lines = ",\n".join(json.dumps(e, ensure_ascii=False) for e in expected)  # one case a line
    (OUT / "expected.json").write_text(f"[\n{lines}\n]\n")
    print(f"wrote {len(expected)} cases to {OUT}")


if __name__ == "__main__":
    main()
