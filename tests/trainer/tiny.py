"""A tiny random Llama-style model, its tokenizer and small datasets in every format, made offline.

    from tests.trainer.tiny import make_tiny_model, make_dataset
    make_tiny_model("/tmp/model")                 # config.json, model.safetensors, tokenizer files
    make_dataset("/tmp/data", "alpaca", "jsonl")  # 64 learnable rows

The data is learnable (the answer repeats a word of the prompt), so a few steps make the loss fall.
"""

from __future__ import annotations

import json
from pathlib import Path

from demo import tiny_model

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver"]
CORPUS = [f"Repeat the word {w} three times: {w} {w} {w}." for w in WORDS]


# The special tokens torchtune's Llama3Tokenizer writes: `tune run` with a llama3 config renders rows with
# them, so the model folder of such a run has them (as Llama 3's own folders do).
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>")  # fmt: skip


def make_tiny_model(path: str | Path, **kwargs) -> Path:
    """The demo's tiny random Llama-style model (demo/tiny_model.py), with a tokenizer for these rows."""
    return tiny_model.make_tiny_model(path, CORPUS, **kwargs)


def make_tokenizer(path: str | Path, **kwargs):
    """The tokenizer alone (see make_tiny_model)."""
    return tiny_model.make_tokenizer(path, CORPUS, **kwargs)


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


# Tiny configs of architectures other than Llama, from transformers' own config classes: two layers, four
# heads (two key/value heads where the architecture has GQA), four experts with two active in MoE ones. Each
# brings its quirks: biases (Qwen2), q/k norms (Qwen3, OLMo 2), sliding windows and soft-capping (Mistral,
# Gemma 2/3), fused QKV and gate/up projections (Phi-3, GPT-NeoX, GPT-2 Conv1D), tied embeddings (GPT-2),
# routers, fused expert stacks and shared experts (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE).
DENSE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
GQA = {**DENSE, "num_key_value_heads": 2}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
ARCHS: dict[str, dict] = {
    "qwen2": GQA,
    "qwen3": {**GQA, "head_dim": 16},
    "qwen3_moe": {**GQA, **MOE, "head_dim": 16},
    "qwen2_moe": {**GQA, **MOE, "shared_expert_intermediate_size": 64},
    "mixtral": {**GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {**GQA, "num_experts": 4, "num_experts_per_tok": 2},
    "mistral": {**GQA, "sliding_window": 16},
    "gemma2": {**GQA, "head_dim": 16, "sliding_window": 16},
    "gemma3_text": {**GQA, "head_dim": 16, "sliding_window": 16},
    "phi3": GQA,
    "gpt_neox": DENSE,
    "olmo2": GQA,
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
}
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def make_arch_model(path: str | Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A tiny random causal LM of `model_type` (a key of ARCHS) with the tokenizer of make_tiny_model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    # The trainer loads the tokenizer class of the model type, which may add tokens of its own
    # (Qwen2Tokenizer adds <|endoftext|>): the embedding gets a row for every id of the tokenizer as loaded
    # beside config.json.
    AutoConfig.for_model(model_type, **ARCHS[model_type]).save_pretrained(str(path))
    vocab = len(AutoTokenizer.from_pretrained(str(path)))
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**ARCHS[model_type], **overrides},
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path), safe_serialization=True)
    return path


def preference_rows(form: str = "strings", n: int = 64) -> list[dict]:
    """n preference pairs with a rule: the chosen answer repeats the prompt's word, the rejected another word.

    form: "strings" (prompt/chosen/rejected) or "chat" (chosen/rejected message lists sharing the user turn).
    """
    out = []
    for i in range(n):
        w, other = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        if other == w:
            other = WORDS[(i + 1) % len(WORDS)]
        prompt, good, bad = f"Repeat the word {w} three times.", f"{w} {w} {w}", f"{other} {other} {other}"
        if form == "strings":
            out.append({"prompt": prompt + " ", "chosen": good, "rejected": bad})
        elif form == "chat":
            user = {"role": "user", "content": prompt}
            out.append(
                {
                    "chosen": [user, {"role": "assistant", "content": good}],
                    "rejected": [user, {"role": "assistant", "content": bad}],
                }
            )
        else:
            raise ValueError(form)
    return out


def make_preference_dataset(path: str | Path, form: str = "strings", n: int = 64) -> Path:
    """preference_rows as a train.jsonl, as the dataset initializer could leave it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_rows(form, n)))
    return path
