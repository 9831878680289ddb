"""A conversation as (input_ids, labels): rendered by the model's chat template (message_format plain)
or as torchtune 0.6.1's tokenizer of a model family writes it (llama3, chatml, llama2, phi3, phi4).

Labels: prompt tokens are -100 unless `train_on_prompt`; the assistant's turns are the targets. The system
message `system_prompt` adds is never a target (torchtune's new_system_prompt), even with train_on_prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from pathlib import Path

from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import MessageError, TrainerError
from pkg.trainer.loss import IGNORE_INDEX
from pkg.trainer.rows import PROMPT_TEMPLATES
from pkg.trainer.spm_model import user_defined_pieces

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
    if cfg.train_on_prompt:  # every token but the added system message's
        hidden = [(text.find(m["content"]), len(m["content"])) for m in msgs if m.get("masked")]
        hidden = [(a, a + n) for a, n in hidden if a >= 0]
        return ids, [
            IGNORE_INDEX if any(a <= start < b for a, b in hidden) else tok
            for tok, (start, _) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    labels = [
        tok if any(a <= start < b for a, b in spans) and end > start else IGNORE_INDEX
        for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


# ---------------------------------------------------------------- torchtune 0.6.1's model tokenizers
# message_format other than plain renders a conversation as the tokenize_messages of torchtune 0.6.1's
# tokenizer of that family does, with the model folder's tokenizer: the same special tokens, the same text
# pieces each encoded on its own (so the same ids for the same vocabulary), the same masks and truncation.
# The reference outputs the tests compare against are written by scripts/gen_format_fixtures.py.


@dataclasses.dataclass
class Message:
    """torchtune's Message: a role, its content as text pieces (a prompt template adds pieces of its own,
    which are encoded apart), and `masked` (no target)."""

    role: str
    pieces: list[str]
    masked: bool


def torchtune_messages(msgs: list[dict], train_on_prompt: bool) -> list[Message]:
    """As torchtune's message transforms mask them: the assistant's messages are targets, the others too
    with train_on_prompt (train_on_input), except the system message `system_prompt` put first (marked
    masked, as new_system_prompt's), which never is."""
    masked = [m.get("masked") or (m["role"] != "assistant" and not train_on_prompt) for m in msgs]
    return [Message(m["role"], [m["content"]], bool(k)) for m, k in zip(msgs, masked, strict=True)]


# ------------------------------------------ prompt templates (torchtune.data / torchtune.models.*)


def _tagged(tags: dict[str, tuple[str, str]]):
    """torchtune's PromptTemplate: a role's prefix and suffix become pieces of their own (empty ones none)."""

    def apply(msgs: list[Message]) -> list[Message]:
        out = []
        for m in msgs:
            prefix, suffix = tags.get(m.role, ("", ""))
            pieces = [*([prefix] if prefix else []), *m.pieces, *([suffix] if suffix else [])]
            out.append(Message(m.role, pieces, m.masked))
        return out

    return apply


def _llama2_chat(msgs: list[Message]) -> list[Message]:
    """Llama2ChatTemplate: "[INST] " and " [/INST] " around every user message; the system message is no
    message of its own but "<<SYS>>\\n...\\n<</SYS>>\\n\\n" inside every user message after it (so it is
    trained or not as that user message is)."""
    system: list[str] = []
    out = []
    for m in msgs:
        if m.role == "system":
            system = ["<<SYS>>\n", *m.pieces, "\n<</SYS>>\n\n"]
        elif m.role == "user":
            out.append(Message("user", ["[INST] ", *system, *m.pieces, " [/INST] "], m.masked))
        else:
            out.append(m)
    return out


def _mistral_chat(msgs: list[Message]) -> list[Message]:
    """MistralChatTemplate: "[INST] " and " [/INST] " around every user message, an empty piece before and
    after every assistant message (which ends it in no space); a system message is an error."""
    if any(m.role == "system" for m in msgs):
        raise MessageError(
            "prompt_template mistral_chat (torchtune's MistralChatTemplate, mistral_tokenizer's default) "
            "takes no system message, and a row has one: drop it, or set tokenizer.prompt_template=null"
        )
    tags = {"user": ("[INST] ", " [/INST] "), "assistant": ("", "")}
    return [Message(m.role, [tags[m.role][0], *m.pieces, tags[m.role][1]], m.masked) if m.role in tags else m
            for m in msgs]  # fmt: skip


TEMPLATES = {
    "": lambda msgs: msgs,
    **{name: _tagged({"user": tags}) for name, tags in PROMPT_TEMPLATES.items()},
    "llama2_chat": _llama2_chat,
    "mistral_chat": _mistral_chat,
}


# ------------------------------------------ encoding pieces


SPM_SPACE = "\u2581"  # sentencepiece's visible space


@functools.lru_cache(maxsize=8)
def _dummy_prefix(tokenizer) -> str:
    """How the tokenizer writes sentencepiece's dummy prefix (the "▁" before a text): "none" (Gemma's
    models have none), "always" (as sentencepiece does), or "unless_space": transformers' Llama tokenizers
    (Metaspace, prepend_scheme first) leave it out before a leading space, where sentencepiece writes "▁▁"."""

    def pieces(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return "".join(tokenizer.convert_ids_to_tokens(ids))

    if not pieces("a").startswith(SPM_SPACE):
        return "none"
    return "always" if pieces(" ") == SPM_SPACE * 2 else "unless_space"


SENTENCEPIECE_FORMATS = ("llama2", "phi3")  # torchtune's tokenizers of these encode with sentencepiece


@functools.lru_cache(maxsize=8)
def _user_defined(tokenizer) -> tuple[str, ...] | None:
    """The user-defined pieces of the model folder's tokenizer.model that the tokenizer has (longest
    first): sentencepiece makes each the token wherever a text names it (Gemma's <start_of_turn>). None
    without tokenizer.model."""
    path = Path(tokenizer.name_or_path or "/nonexistent") / "tokenizer.model"
    if not path.is_file():
        return None
    known = [p for p in user_defined_pieces(path) if tokenizer.convert_ids_to_tokens(
        tokenizer.convert_tokens_to_ids(p)) == p]  # fmt: skip
    return tuple(sorted(known, key=len, reverse=True))


@functools.lru_cache(maxsize=8)
def _unsure_pieces(tokenizer) -> re.Pattern | None:
    """Without tokenizer.model, the tokenizer's added tokens but its BOS, EOS, PAD and UNK (sentencepiece's
    control and unknown pieces): each may be a user-defined piece, which sentencepiece makes the token in a
    text, or a control piece, which it leaves text; tokenizer.json marks both special (Gemma's folders)."""
    known = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
    names = sorted({str(t) for t in tokenizer.added_tokens_decoder.values()} - known, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


# torchtune 0.6.1's GPT2BaseTokenizer (Phi4Tokenizer's) splits a text into words with this pattern of Python's
# re, whose \w keeps letters, digits and '_' together (transformers' GPT2Tokenizer splits "x_1" and "abc123"
# apart), then encodes each word's UTF-8 bytes, written as GPT-2's printable characters, with the BPE.
PHI4_WORDS = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\w]+| ?\d+| ?[^\s\w\d]+|\s+(?!\S)|\s+""")


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, as a list indexed by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


class WordBPE:
    """Phi4Tokenizer's encode of a text: torchtune's word split, then the model folder's BPE (its vocabulary
    and merges, applied as GPT-2's BPE applies them: no whole-word shortcut) on each word."""

    def __init__(self, tokenizer) -> None:
        from tokenizers.models import BPE

        backend = getattr(tokenizer, "backend_tokenizer", None)
        state = json.loads(backend.to_str())["model"] if backend is not None else {}
        if state.get("type") != "BPE":
            raise TrainerError(
                "message_format=phi4: the model's tokenizer is not a byte-level BPE (tokenizer.json) as "
                "Phi-4's is; use the model family's tokenizer or message_format=plain"
            )
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
        self.bpe = BPE(vocab=state["vocab"], merges=merges)
        self.chars = _byte_chars()
        self.words: dict[str, list[int]] = {}  # as torchtune caches them: rows repeat their words

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in PHI4_WORDS.findall(text):
            if word not in self.words:
                if len(self.words) >= 1 << 17:  # a bound on a corpus of ever new words
                    self.words.clear()
                chars = "".join(self.chars[b] for b in word.encode())
                self.words[word] = [t.id for t in self.bpe.tokenize(chars)]
            ids += self.words[word]
        return ids


@functools.lru_cache(maxsize=8)
def _word_bpe(tokenizer) -> WordBPE:
    return WordBPE(tokenizer)


class Pieces:
    """Special tokens and text pieces as torchtune's tokenizers encode them, in the model folder's ids."""

    def __init__(self, tokenizer, fmt: str) -> None:
        self.tokenizer, self.fmt = tokenizer, fmt

    def special(self, token: str) -> int:
        tok = self.tokenizer.convert_tokens_to_ids(token)  # an unknown name: None, or the unknown token's id
        if tok is None or self.tokenizer.convert_ids_to_tokens(tok) != token:
            raise TrainerError(
                f"message_format={self.fmt}: the tokenizer has no {token} token; use the model family's "
                "tokenizer or message_format=plain"
            )
        return tok

    def bos_eos(self) -> tuple[int, int]:
        """The tokenizer's BOS and EOS (sentencepiece's bos_id and eos_id in torchtune)."""
        for name in ("bos", "eos"):
            if getattr(self.tokenizer, f"{name}_token_id") is None:
                raise TrainerError(
                    f"message_format={self.fmt}: the tokenizer has no {name}_token (tokenizer_config.json); "
                    "use the model family's tokenizer or message_format=plain"
                )
        return self.tokenizer.bos_token_id, self.tokenizer.eos_token_id

    def text(self, text: str) -> list[int]:
        """A piece of text: the tokenizer's ids. A special token's name in it is text too (sentencepiece,
        tiktoken and Phi4Tokenizer encode it so), but for Qwen2Tokenizer, which makes it the token, and
        sentencepiece's user-defined pieces, which it makes the token (the text after one has no dummy
        prefix: sentencepiece writes that once, before the whole text)."""
        if not text:
            return []
        pieces = _user_defined(self.tokenizer) if self.fmt in SENTENCEPIECE_FORMATS else ()
        if pieces is None:
            self._refuse_unsure_pieces(text)
        if not pieces:
            return self._encode(text)
        ids: list[int] = []
        for k, part in enumerate(re.split(f"({'|'.join(map(re.escape, pieces))})", text)):
            if part in pieces:
                ids.append(self.tokenizer.convert_tokens_to_ids(part))
            elif part and (k == 0 or _dummy_prefix(self.tokenizer) == "none"):
                ids += self._encode(part)
            elif part:  # encoded after a newline whose tokens are cut off: no dummy prefix
                ids += self._encode("\n" + part)[len(self._encode("\n")) :]
        return ids

    def _refuse_unsure_pieces(self, text: str) -> None:
        unsure = _unsure_pieces(self.tokenizer)
        found = unsure.search(text) if unsure else None
        if found:
            raise TrainerError(
                f"message_format={self.fmt}: a row (or its prompt template) holds {found[0]}, which "
                "sentencepiece makes one token if it is a user-defined piece of the model (as Gemma's "
                f"<start_of_turn>) and text if not, and {self.tokenizer.name_or_path} has no tokenizer.model "
                f"to tell: add the model's tokenizer.model to the folder, or leave {found[0]} out of the rows"
            )

    def _encode(self, text: str) -> list[int]:
        if self.fmt == "phi4":
            return _word_bpe(self.tokenizer).encode(text)
        split = self.fmt != "chatml"
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]

    def spm(self, text: str) -> list[int]:
        """sentencepiece's encode(text): with the dummy prefix where the model has one."""
        if text.startswith(" ") and _dummy_prefix(self.tokenizer) == "unless_space":
            text = " " + text  # a text that starts with "▁" gets none: this one is the dummy prefix
        return self.text(text)

    def spm_trimmed(self, text: str) -> list[int]:
        """SentencePieceBaseTokenizer.encode(trim_leading_whitespace=True): encoded after a newline whose
        tokens are then cut off, so no dummy prefix (every model's vocabulary encodes whitespace, the
        condition torchtune checks first)."""
        return self.spm("\n" + text)[len(self.spm("\n")) :]


def _truncate(ids: list[int], mask: list[bool], max_len: int, eos: int | None, last_masked: bool | None):
    """torchtune's truncate() on the tokens and on the mask: cut to max_len; the last token becomes `eos`
    and its mask `last_masked` where they are given."""
    ids, mask = ids[:max_len], mask[:max_len]
    if eos is not None and ids[-1] != eos:
        ids[-1] = eos
    if last_masked is not None and mask[-1] != last_masked:
        mask[-1] = last_masked
    return ids, mask


# ------------------------------------------ tokenize_messages per family: (ids, mask), True = no target
# max_len: tokenizer.max_seq_len, None where null (torchtune then neither stops early nor truncates).


def _llama3(enc: Pieces, msgs: list[Message], max_len: int | None) -> tuple[list[int], list[bool]]:
    """Llama3Tokenizer: BOS; per message a header (role, "\\n\\n"), every piece stripped, <|eot_id|>;
    EOS. BOS and EOS are never targets."""
    bos, eos = enc.special("<|begin_of_text|>"), enc.special("<|end_of_text|>")
    start, end, eot = (enc.special(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    ids, mask = [bos], [True]
    for m in msgs:
        body = [start, *enc.text(m.role.strip()), end, *enc.text("\n\n")]
        body += [t for p in m.pieces for t in enc.text(p.strip())] + [eot]
        ids, mask = ids + body, mask + [m.masked] * len(body)
        if max_len and len(ids) >= max_len:
            break
    ids, mask = [*ids, eos], [*mask, True]
    return _truncate(ids, mask, max_len, eos, True) if max_len else (ids, mask)


def _chatml(enc: Pieces, msgs: list[Message], max_len: int | None) -> tuple[list[int], list[bool]]:
    """Qwen2Tokenizer / Qwen2_5Tokenizer: no BOS; per message <|im_start|>, "role\\n", the pieces as they
    are, then <|im_end|> "\\n" except after the last assistant message; the EOS (<|im_end|>) takes the mask
    of the token before it."""
    im_start, im_end = enc.special("<|im_start|>"), enc.special("<|im_end|>")
    ids: list[int] = []
    mask: list[bool] = []
    for k, m in enumerate(msgs):
        body = [im_start, *enc.text(f"{m.role}\n"), *(t for p in m.pieces for t in enc.text(p))]
        if m.role != "assistant" or k != len(msgs) - 1:
            body += [im_end, *enc.text("\n")]
        ids, mask = ids + body, mask + [m.masked] * len(body)
        if max_len and len(ids) >= max_len:
            break
    ids, mask = [*ids, im_end], [*mask, mask[-1]]
    return _truncate(ids, mask, max_len, im_end, True) if max_len and len(ids) > max_len else (ids, mask)


def _llama2(enc: Pieces, msgs: list[Message], max_len: int | None) -> tuple[list[int], list[bool]]:
    """Llama2Tokenizer, MistralTokenizer and GemmaTokenizer (tokenize_messages_no_special_tokens): no
    special tokens but a BOS before each turn and an EOS after each assistant message, with that message's
    mask; every piece without its trailing spaces; a message that continues a turn is encoded without a
    leading space unless the one before ended in a space."""
    bos, eos = enc.bos_eos()
    ids: list[int] = []
    mask: list[bool] = []
    turn_starts, after_space = True, False
    for m in msgs:
        if turn_starts:
            ids, mask = [*ids, bos], [*mask, m.masked]
        encode = enc.spm if turn_starts or after_space else enc.spm_trimmed
        body = [t for p in m.pieces for t in encode(p.rstrip(" "))]
        after_space = m.pieces[-1].endswith(" ")
        turn_starts = m.role == "assistant"
        body += [eos] if turn_starts else []
        ids, mask = ids + body, mask + [m.masked] * len(body)
        if max_len and len(ids) >= max_len:
            break
    return _truncate(ids, mask, max_len, eos, m.masked) if max_len else (ids, mask)


def _phi3(enc: Pieces, msgs: list[Message], max_len: int | None) -> tuple[list[int], list[bool]]:
    """Phi3MiniTokenizer: BOS (with the first message's mask); per message its role token, "\\n", the
    pieces without trailing spaces nor a leading one, <|end|>, "\\n"; no EOS (the dataset calls
    tokenize_messages with add_eos False)."""
    bos, _ = enc.bos_eos()
    roles = {r: enc.special(f"<|{r}|>") for r in ("system", "user", "assistant")}
    end, newline = enc.special("<|end|>"), enc.spm("\n")
    ids, mask = [bos], [msgs[0].masked]
    for m in msgs:
        if m.role not in roles:
            raise MessageError(
                f"message_format=phi3: a message's role is {m.role!r}, not one of {list(roles)}"
            )
        body = [roles[m.role], *newline, *(t for p in m.pieces for t in enc.spm_trimmed(p.rstrip(" ")))]
        body += [end, *newline]
        ids, mask = ids + body, mask + [m.masked] * len(body)
        if max_len and len(ids) >= max_len:
            break
    return ids[:max_len], mask[:max_len]


def _phi4(enc: Pieces, msgs: list[Message], max_len: int | None) -> tuple[list[int], list[bool]]:
    """Phi4Tokenizer: no BOS nor EOS; per message <|im_start|>, the role, <|im_sep|>, the pieces without
    trailing spaces, and <|im_end|> except after an assistant message."""
    im_start, im_sep, im_end = (enc.special(t) for t in ("<|im_start|>", "<|im_sep|>", "<|im_end|>"))
    ids: list[int] = []
    mask: list[bool] = []
    for m in msgs:
        body = [im_start, *enc.text(m.role), im_sep, *(t for p in m.pieces for t in enc.text(p.rstrip(" ")))]
        body += [] if m.role == "assistant" else [im_end]
        ids, mask = ids + body, mask + [m.masked] * len(body)
        if max_len and len(ids) >= max_len:
            break
    return ids[:max_len], mask[:max_len]


FORMATS = {"llama3": _llama3, "chatml": _chatml, "llama2": _llama2, "phi3": _phi3, "phi4": _phi4}


def format_messages(tokenizer, msgs: list[dict], cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation as torchtune 0.6.1's tokenizer of cfg.message_format, with
    cfg.prompt_template, renders it (tokenize_messages)."""
    messages = TEMPLATES[cfg.prompt_template](torchtune_messages(msgs, cfg.train_on_prompt))
    render = FORMATS[cfg.message_format]
    max_len = None if cfg.truncation == "none" else cfg.max_seq_length
    ids, mask = render(Pieces(tokenizer, cfg.message_format), messages, max_len)
    if cfg.message_format == "chatml" and cfg.truncation == "torchtune":
        mask[-1] = True  # Qwen2Tokenizer's truncate() runs with any max_seq_len: the EOS is never a target
    return ids, [IGNORE_INDEX if masked else t for t, masked in zip(ids, mask, strict=True)]


# The BOS and EOS torchtune's encode(text, add_bos=True, add_eos) writes around a text_completion_dataset row:
# the special tokens below, or sentencepiece's own (llama2: the tokenizer's); None: no BOS (Qwen).
TEXT_ENDS = {"llama3": ("<|begin_of_text|>", "<|end_of_text|>"), "chatml": (None, "<|im_end|>"),
             "phi3": ("<s>", "</s>"), "phi4": ("<|endoftext|>", "<|im_end|>")}  # fmt: skip


def format_text(tokenizer, text: str, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a text row as torchtune 0.6.1's text_completion_dataset makes it with the
    tokenizer of cfg.message_format: encode(text, add_bos=True, add_eos=add_eos), cut to max_seq_length - 1
    (its truncate, with no EOS put back); every token a target."""
    enc = Pieces(tokenizer, cfg.message_format)
    if cfg.message_format == "llama2":
        bos, eos = enc.bos_eos()
    else:
        first, last = TEXT_ENDS[cfg.message_format]
        bos, eos = (enc.special(first) if first else None), enc.special(last)
    body = enc.spm(text) if cfg.message_format in ("llama2", "phi3") else enc.text(text)
    ids = [*([bos] if bos is not None else []), *body, *([eos] if cfg.add_eos else [])]
    if cfg.truncation != "none":
        ids = ids[: cfg.max_seq_length - 1]
    return ids, list(ids)
