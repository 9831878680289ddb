"""A conversation as (input_ids, labels): rendered by the model's chat template (message_format plain)
or in a model family's special tokens as torchtune's tokenizers write them (llama3, chatml).

Labels: prompt tokens are -100 unless `train_on_prompt`; the assistant's turns are the targets.
"""

from __future__ import annotations

import logging

from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError
from pkg.trainer.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        log.warning(
            "the model's tokenizer has no chat template: rendering messages as '<|role|>\\ncontent</s>' "
            "(add chat_template to the tokenizer config to use the model's own format)"
        )
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def tokenize_messages(tokenizer, msgs: list[dict], cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template; assistant turns (with end marks) are the targets."""
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True) if k else ""
        )
        through = tokenizer.apply_chat_template(msgs[: k + 1], tokenize=False)
        if text.startswith(before) and text.startswith(through):
            spans.append((len(before), len(through)))
        else:  # a template that rewrites earlier turns: fall back to the reply text itself
            start = text.find(m["content"], spans[-1][1] if spans else 0)
            if start >= 0:
                spans.append((start, start + len(m["content"])))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if cfg.train_on_prompt:
        return ids, list(ids)
    labels = [
        tok if any(a <= start < b for a, b in spans) and end > start else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


# torchtune 0.6.1's model tokenizers wrap each message in their family's special tokens and encode every
# piece on its own (tokenize_messages); (special token, text) pieces here are encoded the same way, so the
# ids are the same for the same tokenizer files. A piece is (text, is_special_token, trained).
def _llama3_pieces(msgs: list[dict], train_on_prompt: bool) -> list[tuple[str, bool, bool]]:
    """Llama3Tokenizer: BOS, then per message a header, the stripped content and <|eot_id|>, then EOS;
    BOS and EOS are never trained, a message (header and end included) is trained when it is the
    assistant's or train_on_prompt is set."""
    out = [("<|begin_of_text|>", True, False)]
    for m in msgs:
        t = train_on_prompt or m["role"] == "assistant"
        out += [
            ("<|start_header_id|>", True, t),
            (m["role"].strip(), False, t),
            ("<|end_header_id|>", True, t),
        ]
        out += [("\n\n", False, t), (m["content"].strip(), False, t), ("<|eot_id|>", True, t)]
    return [*out, ("<|end_of_text|>", True, False)]


def _chatml_pieces(msgs: list[dict], train_on_prompt: bool) -> list[tuple[str, bool, bool]]:
    """Qwen2Tokenizer / Qwen2_5Tokenizer: no BOS and no default system message; content is not stripped;
    the last assistant message has no <|im_end|>\\n footer, and the EOS (<|im_end|>) after it takes that
    message's mask."""
    out: list[tuple[str, bool, bool]] = []
    t = False
    for k, m in enumerate(msgs):
        t = train_on_prompt or m["role"] == "assistant"
        out += [("<|im_start|>", True, t), (f"{m['role']}\n", False, t), (m["content"], False, t)]
        if m["role"] != "assistant" or k != len(msgs) - 1:
            out += [("<|im_end|>", True, t), ("\n", False, t)]
    return [*out, ("<|im_end|>", True, t)]


MESSAGE_PIECES = {"llama3": _llama3_pieces, "chatml": _chatml_pieces}


def format_messages(tokenizer, msgs: list[dict], cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation in cfg.message_format's special tokens (not plain)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, special, trained in MESSAGE_PIECES[cfg.message_format](msgs, cfg.train_on_prompt):
        if special:
            tok = tokenizer.convert_tokens_to_ids(text)
            if tok is None or tok == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tok) != text:
                raise TrainerError(
                    f"message_format={cfg.message_format}: the tokenizer has no {text} token; use the "
                    "model family's tokenizer or message_format=plain"
                )
            piece = [tok]
        else:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if len(ids) > cfg.max_seq_length:  # torchtune's truncate(): the last kept token is the EOS, untrained
        ids, labels = (
            [*ids[: cfg.max_seq_length - 1], ids[-1]],
            [*labels[: cfg.max_seq_length - 1], IGNORE_INDEX],
        )
    return ids, labels
