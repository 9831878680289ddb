"""A tiny random Llama-style model and a byte-level BPE tokenizer, made offline in a second.

    from demo.tiny_model import make_tiny_model
    make_tiny_model("/tmp/model", corpus=["some text the tokenizer should know", ...])

The demo trains it on its embedded dataset; the tests use it as a stand-in for a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Markers of the prompt formats the trainer renders, so the tokenizer knows them as whole tokens.
FORMAT_CORPUS = [
    "### Instruction:\n### Input:\n### Response:\n<|user|>\n<|assistant|>\n<|system|>\nWhat is the answer?"
]


def make_tokenizer(
    path: str | Path,
    corpus: Sequence[str],
    vocab: int = 320,
    chat_template: bool = True,
    special_tokens: Sequence[str] = (),
):
    """Train a byte-level BPE tokenizer on `corpus`, with <s>, </s>, <pad>, `special_tokens` (a model
    family's, e.g. Llama 3's header tokens) and optionally a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>", "<pad>", *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, *FORMAT_CORPUS] * 4, trainer=trainer)
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
    corpus: Sequence[str],
    vocab: int = 320,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    chat_template: bool = True,
    init_std: float = 0.02,
    special_tokens: Sequence[str] = (),
) -> Path:
    """Write a random Llama-style causal LM (safetensors) and its tokenizer into `path`.

    A larger `init_std` gives the frozen output head room for confident logits, so LoRA alone can
    teach a random model a task (with 0.02 the reachable logit margin is too small to matter).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path, corpus, vocab, chat_template, special_tokens)
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
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path
