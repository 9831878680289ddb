"""A tiny random Llama-style model, its tokenizer and small datasets in every format, made offline.

    from tests.trainer.tiny import make_tiny_model, make_dataset
    make_tiny_model("/tmp/model")                 # config.json, model.safetensors, tokenizer files
    make_dataset("/tmp/data", "alpaca", "jsonl")  # 64 learnable rows

The data is learnable (the answer repeats a word of the prompt), so a few steps make the loss fall.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver"]
CORPUS = [f"Repeat the word {w} three times: {w} {w} {w}." for w in WORDS] + [
    "### Instruction:\n### Input:\n### Response:\n<|user|>\n<|assistant|>\n<|system|>\nWhat is the answer?"
]


def make_tokenizer(path: str | Path, vocab: int = 320, chat_template: bool = True):
    """A byte-level BPE tokenizer with <s>, </s>, <pad> and (optionally) a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(
    path: str | Path,
    vocab: int = 320,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Write a random Llama-style causal LM (safetensors) and its tokenizer into `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path, vocab, chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path


def rows(fmt: str, n: int = 64) -> list[dict]:
    """n learnable rows in one of the formats: alpaca, messages, prompt_completion, text."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        prompt, answer = f"Repeat the word {w} three times.", f"{w} {w} {w}"
        if fmt == "alpaca":
            out.append({"instruction": prompt, "input": "" if i % 2 else "now", "output": answer})
        elif fmt == "messages":
            out.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            )
        elif fmt == "prompt_completion":
            out.append({"prompt": prompt, "completion": answer})
        elif fmt == "text":
            out.append({"text": f"{prompt} {answer}."})
        else:
            raise ValueError(fmt)
    return out


def make_dataset(path: str | Path, fmt: str = "alpaca", file_type: str = "jsonl", n: int = 64) -> Path:
    """Write rows as the dataset initializer could leave them.

    file_type: jsonl, json, parquet, csv, arrow (a save_to_disk folder) or hub (data/train-*.parquet plus a
    data/test-*.parquet split that must not be trained on).
    """
    import datasets

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    data = rows(fmt, n)
    if file_type == "jsonl":
        (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    elif file_type == "json":
        (path / "train.json").write_text(json.dumps(data))
    else:
        ds = datasets.Dataset.from_list(data)
        if file_type == "parquet":
            ds.to_parquet(str(path / "train.parquet"))
        elif file_type == "csv":
            ds.to_csv(str(path / "train.csv"), index=False)
        elif file_type == "arrow":
            ds.save_to_disk(str(path))
        elif file_type == "hub":
            (path / "data").mkdir(exist_ok=True)
            ds.to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
            bad = (
                datasets.Dataset.from_list([{k: "TEST SPLIT" for k in data[0]}] * 4)
                if fmt != "messages"
                else ds
            )
            bad.to_parquet(str(path / "data" / "test-00000-of-00001.parquet"))
            (path / "README.md").write_text("---\nlicense: mit\n---\n")
        else:
            raise ValueError(file_type)
    return path
