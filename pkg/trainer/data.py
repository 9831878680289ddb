"""Training data: load what the dataset initializer left, tokenize once, pack, and plan the batches.

- Files: json, jsonl, parquet, csv, arrow, a `save_to_disk` folder, a Hub snapshot (`data/train-*.parquet`;
  the split comes from the file or folder name) or one data file; `dataset_source` names the type when the
  extensions do not (text, xml). `dataset_split` picks the split (`train`) and slices it (`train[:10%]`).
- Formats (`dataset_format`, or detected from the columns, after renaming them by `column_map`): alpaca
  (instruction/input/output), messages (role/content, rendered with the tokenizer's chat template),
  prompt_completion, text, input_output (a user turn and an assistant reply, rendered like messages).
  `system_prompt` becomes the first message of chat formats and the first paragraph of the others.
- Labels: prompt tokens are -100 unless `train_on_prompt`; the first token of every sample is never a
  target, so packed samples never predict across their boundary.
- Packing: samples are concatenated into sequences of at most `max_seq_length` tokens, each with its own
  position ids (0, 1, ... per sample); transformers turns restarting position ids into a block-diagonal mask.
- Cache: rank 0 tokenizes into `output_dir/cache/tokenized-<key>/` (a temporary folder, then renamed), and
  so does each node's first rank where output_dir is not shared across nodes; the other ranks wait and
  read it.
- Batch plan: the samples of optimizer step k are a pure function of (seed, k), whatever the world size;
  each rank takes its contiguous slice and splits it into micro-batches.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pkg.trainer.config import TrainConfig, split_spec
from pkg.trainer.errors import TrainerError
from pkg.trainer.files import atomic_dir, dir_digest
from pkg.trainer.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

CACHE_VERSION = "2"  # bumped when the same settings tokenize differently (2: system_prompt on DPO pairs)
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Types read only when `dataset_source` names them: a folder's README.txt is not training data by default.
SOURCE_ONLY = {".txt": "text", ".text": "text", ".xml": "xml"}
SPLITS = ("train", "validation", "valid", "test", "dev", "eval")
FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "input_output": ("input", "output"),
}
CHAT_FORMATS = ("messages", "input_output")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
# The Stanford Alpaca preamble (alpaca_preamble), word for word as torchtune 0.6.1's AlpacaToMessages writes
# it; keyed by whether the row has an input.
ALPACA_PREAMBLE = {
    True: "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n",
    False: "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n",
}
# torchtune 0.6.1's fixed PromptTemplates (torchtune/data/_prompt_templates.py): user message prefix, suffix.
PROMPT_TEMPLATES = {
    "grammar": ("Correct this to standard English: ", "\n---\nCorrected: "),
    "summarize": ("Summarize this dialogue:\n", "\n---\nSummary:\n"),
}
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------- loading


def _split_of(rel: Path) -> str | None:
    """The split of a file from its name (train-00000-of-00001.parquet, train.jsonl, train/x.arrow)."""
    for part in [*rel.parent.parts, rel.name]:
        match = re.match(r"^([a-z]+)(?:[-_.].*)?$", part.lower())
        if match and match.group(1) in SPLITS:
            return match.group(1)
    return None


def _builder(path: Path, source: str) -> str | None:
    """The `datasets` builder of a data file, or None when it is not one of `source`'s files."""
    builder = BUILDERS.get(path.suffix.lower()) or SOURCE_ONLY.get(path.suffix.lower())
    if source == "auto":
        return BUILDERS.get(path.suffix.lower())
    return builder if builder == source else None


def find_split_files(dataset_dir: Path, split: str = "train", source: str = "auto") -> list[tuple[str, Path]]:
    """(`datasets` builder, file) of every data file of one split; files named for no split count as train.

    Every file of the split is used (whatever its name or type); files of other splits are named in the log.
    """
    visible = sorted(
        p
        for p in dataset_dir.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    files = [p for p in visible if _builder(p, source)]
    if ignored := [str(p.relative_to(dataset_dir)) for p in visible if not _builder(p, source)]:
        log.info("not read (not a data file for dataset_source %s): %s", source, _some(ignored))
    if not files:
        kinds = "json, jsonl, parquet, csv, arrow files or a save_to_disk folder"
        raise TrainerError(
            f"no data files in {dataset_dir}: expected {kinds if source == 'auto' else source + ' files'}"
        )
    by_split = {p: _split_of(p.relative_to(dataset_dir)) or "train" for p in files}
    chosen = [p for p, s in by_split.items() if s == split]
    if not chosen:
        found = sorted(set(by_split.values()))
        raise TrainerError(f"no {split} split in {dataset_dir}: found only {', '.join(found)}")
    others = [f"{p.relative_to(dataset_dir)} ({s})" for p, s in by_split.items() if s != split]
    if others:
        log.info("not used (another split than %s): %s", split, _some(others))
    return [(_builder(p, source), p) for p in chosen]  # type: ignore[misc]


def _some(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_text(path: Path) -> None:
    """Refuse a text data file (json, jsonl, csv) that is not UTF-8, naming its line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                line = lines + block[: exc.start].count(b"\n")
                raise TrainerError(
                    f"{path} line {line}: bytes that are not UTF-8 (at byte {offset + exc.start}): "
                    "save the file as UTF-8"
                ) from None
            offset, lines = offset + len(block), lines + block.count(b"\n")


def _json_problem(path: Path) -> str | None:
    """Where a JSON or JSON Lines file stops being valid (its first bad line), or None."""
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as exc:
                return f"line {i} is not valid JSON ({exc})"
    return None


def _load_file(builder: str, path: Path, name: str, cache_dir: str):
    """One data file as a Dataset; its problems named by file (and line, for JSON)."""
    import datasets

    if builder in ("json", "csv", "text"):
        check_text(path)
        if not path.read_bytes().strip():
            return None  # empty or blank lines only: no rows (counted as 0 in the log)
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its own log of a bad file would precede our one line
    try:
        return datasets.load_dataset(builder, data_files={name: [str(path)]}, split=name, cache_dir=cache_dir)
    except Exception as exc:  # datasets raises many types for unreadable files
        where = _json_problem(path) if builder == "json" else None
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for inner in (exc.__cause__, exc.__context__):  # DatasetGenerationError hides the reason
            if inner is not None and str(inner).strip():
                cause = str(inner).strip().splitlines()[0]
                break
        raise TrainerError(f"cannot read {path}: {where or cause}: fix or remove that file") from None
    finally:
        quiet.setLevel(level)


def _load_files(root: Path, name: str, source: str, cache_dir: str):
    """Every data file of split `name` in `root`, in order, as one Dataset; rows per file in the log."""
    import datasets

    parts, counts = [], []
    for builder, path in find_split_files(root, name, source):
        ds = _load_file(builder, path, name, cache_dir)
        counts.append(f"{path.relative_to(root)} {len(ds) if ds is not None else 0}")
        if ds is not None and len(ds):
            parts.append((path, ds))
    log.info("dataset %s, split %s, rows per file: %s", root, name, _some(counts))
    if not parts:
        raise TrainerError(f"the dataset in {root} has no rows (its files are empty)")
    first, ds0 = parts[0]
    same = [ds0]
    for path, ds in parts[1:]:
        if set(ds.column_names) != set(ds0.column_names):
            raise TrainerError(
                f"{path} has columns {', '.join(ds.column_names)} but {first} has "
                f"{', '.join(ds0.column_names)}: every data file of a split needs the same columns"
            )
        ds = ds.select_columns(ds0.column_names)
        if ds.features != ds0.features:  # string and large_string, int32 and int64 ... are one type here
            try:
                ds = ds.cast(ds0.features)
            except (TypeError, ValueError) as exc:
                raise TrainerError(
                    f"{path}: its columns' types ({dict(ds.features)}) cannot be read as those of {first} "
                    f"({dict(ds0.features)}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
        same.append(ds)
    return datasets.concatenate_datasets(same)


def _load(root: Path, name: str, source: str, cache_dir: str):
    """The whole split `name` of a save_to_disk folder, a folder of data files or one data file."""
    import datasets

    if root.is_file():
        builder = _builder(root, source) if source != "auto" else BUILDERS.get(root.suffix.lower())
        if builder is None:
            raise TrainerError(f"{root}: unknown data file type; set dataset_source")
        ds = _load_file(builder, root, name, cache_dir)
        if ds is None:
            raise TrainerError(f"the dataset in {root} has no rows (the file is empty)")
        return ds
    if (root / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(root))
        if name not in loaded:
            raise TrainerError(f"{root} has splits {list(loaded)} but no {name!r}")
        return loaded[name]
    if (root / "state.json").exists():
        return datasets.load_from_disk(str(root))
    return _load_files(root, name, source, cache_dir)


def select_slice(ds, name: str, bounds: str | None, spec: str):
    """Rows of `ds` (split `name`) inside a Hugging Face slice such as `[:10%]` or `[100:200]`."""
    import datasets

    if bounds is None:
        return ds
    (part,) = datasets.ReadInstruction.from_spec(name + bounds).to_absolute({name: len(ds)})
    if part.to - part.from_ <= 0:
        raise TrainerError(f"dataset_split {spec} selects no rows of the {len(ds)} in split {name}")
    return ds.select(range(part.from_, part.to))


def load_rows(dataset_dir: str, cache_dir: str, split: str = "train", source: str = "auto"):
    """The training rows as a `datasets.Dataset`: split `split` (with its slice) of `dataset_dir`."""
    import datasets

    root = Path(dataset_dir)
    if not root.exists():
        raise TrainerError(f"dataset_dir {root} does not exist")
    name, bounds = split_spec(split)
    datasets.disable_progress_bars()
    try:
        ds = select_slice(_load(root, name, source, cache_dir), name, bounds, split)
    except TrainerError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise TrainerError(f"cannot read the dataset in {root}: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise TrainerError(f"the dataset in {root} has no rows")
    return ds


def rename_columns(ds, column_map: dict[str, str]):
    """Give the dataset's columns the names the format expects ({format column: dataset column})."""
    for wanted, actual in column_map.items():
        if actual not in ds.column_names:
            raise TrainerError(
                f"column_map: the dataset has no column {actual!r} (for {wanted!r}); "
                f"its columns are {', '.join(ds.column_names)}"
            )
    sources = set(column_map.values())
    present = [w for w, a in column_map.items() if w != a and w in ds.column_names and w not in sources]
    if present:  # a column already named like the target steps aside
        ds = ds.remove_columns(present)
    return ds.rename_columns({actual: wanted for wanted, actual in column_map.items() if wanted != actual})


def detect_format(columns: list[str], forced: str) -> str:
    if forced != "auto":
        missing = [c for c in FORMAT_FIELDS[forced] if c not in columns]
        if missing:
            raise TrainerError(
                f"dataset_format {forced} needs columns {', '.join(FORMAT_FIELDS[forced])}; "
                f"the dataset has {', '.join(columns)}"
            )
        return forced
    for fmt, needed in FORMAT_FIELDS.items():
        if all(c in columns for c in needed):
            return fmt
    raise TrainerError(
        f"cannot tell the dataset format from its columns ({', '.join(columns)}): expected "
        "instruction/input/output, messages, prompt/completion, text or input/output (or set dataset_format, "
        "or column_map to rename columns)"
    )


# ---------------------------------------------------------------- tokenizing


def _text(row: dict, key: str, i: int, fmt: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (required and isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        raise TrainerError(f"row {i} has no '{key}' (format {fmt} needs {', '.join(FORMAT_FIELDS[fmt])})")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # CSV and parquet columns of numbers
    if not isinstance(value, str):
        raise TrainerError(f"row {i}: '{key}' must be a string, got {type(value).__name__}")
    return value


def prompt_and_completion(row: dict, fmt: str, i: int, preamble: bool = False) -> tuple[str, str]:
    """The untrained prefix and the trained continuation of one non-chat row."""
    if fmt == "alpaca":
        extra = _text(row, "input", i, fmt, required=False)
        prompt = ALPACA_PROMPT.format(
            instruction=_text(row, "instruction", i, fmt), input=f"### Input:\n{extra}\n\n" if extra else ""
        )
        return (ALPACA_PREAMBLE[bool(extra)] if preamble else "") + prompt, _text(row, "output", i, fmt)
    if fmt == "prompt_completion":
        return _text(row, "prompt", i, fmt), _text(row, "completion", i, fmt)
    return "", _text(row, "text", i, fmt)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        log.warning(
            "the model's tokenizer has no chat template: rendering messages as '<|role|>\\ncontent</s>' "
            "(add chat_template to the tokenizer config to use the model's own format)"
        )
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def with_system(msgs: list[dict], system_prompt: str) -> list[dict]:
    """The conversation with `system_prompt` as its system message (replacing its own), if one is set."""
    if not system_prompt:
        return msgs
    return [{"role": "system", "content": system_prompt}, *(m for m in msgs if m["role"] != "system")]


def with_system_text(prompt: str, system_prompt: str) -> str:
    """A plain-text prompt with `system_prompt` as its first paragraph, if one is set."""
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt


def wrapped(text: str, template: str) -> str:
    """A user message in `prompt_template`'s words (unchanged without one)."""
    prefix, suffix = PROMPT_TEMPLATES.get(template, ("", ""))
    return f"{prefix}{text}{suffix}"


def conversation(row: dict, fmt: str, i: int, system_prompt: str = "", template: str = "") -> list[dict]:
    """A chat-format row as messages: `messages` as it is, input_output as a user and an assistant turn."""
    if fmt == "input_output":
        msgs = [
            {"role": "user", "content": _text(row, "input", i, fmt)},
            {"role": "assistant", "content": _text(row, "output", i, fmt)},
        ]
    else:
        msgs = _messages(row, i)
    if template:
        msgs = [{**m, "content": wrapped(m["content"], template)} if m["role"] == "user" else m for m in msgs]
    return with_system(msgs, system_prompt)


def _messages(row: dict, i: int) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise TrainerError(f"row {i} has no 'messages' list")
    msgs = plain_messages(msgs, f"row {i}: every message")
    if not any(m["role"] == "assistant" for m in msgs):
        raise TrainerError(f"row {i}: no 'assistant' message to train on")
    return msgs


SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def plain_messages(msgs: list, which: str) -> list[dict]:
    """`msgs` as {role, content} dicts (extra keys dropped); `which` names them in the error, which says
    what is wrong with them ("row 3: every message of 'chosen'"). ShareGPT's {from: human|gpt|system,
    value} messages (torchtune's chat_dataset with conversation_style sharegpt) become the same."""
    msgs = [
        {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        if isinstance(m, dict) and "from" in m and "role" not in m
        else m
        for m in msgs
    ]
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TrainerError(f"{which} needs a string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


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


def _pairs(
    chunk: list[dict], lo: int, fmt: str, tokenizer, cfg: TrainConfig
) -> list[tuple[list[int], list[int]]]:
    """Tokenize a chunk of non-chat rows (batched through the fast tokenizer)."""
    if cfg.message_format != "plain" and fmt != "text":  # a user message and the assistant's reply
        pairs = [prompt_and_completion(row, fmt, lo + j, cfg.alpaca_preamble) for j, row in enumerate(chunk)]
        talks = [
            with_system(
                [
                    {"role": "user", "content": wrapped(p, cfg.prompt_template)},
                    {"role": "assistant", "content": c},
                ],
                cfg.system_prompt,
            )
            for p, c in pairs
        ]
        return [format_messages(tokenizer, msgs, cfg) for msgs in talks]
    with_eos = tokenizer.eos_token_id is not None and (fmt != "text" or cfg.add_eos)
    eos = [tokenizer.eos_token_id] if with_eos else []
    pairs = [prompt_and_completion(row, fmt, lo + j, cfg.alpaca_preamble) for j, row in enumerate(chunk)]
    if cfg.prompt_template and fmt != "text":
        pairs = [(wrapped(p, cfg.prompt_template), c) for p, c in pairs]
    pairs = [(with_system_text(p, cfg.system_prompt), c) for p, c in pairs]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = p + c + eos
        out.append((ids, list(ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(p) + c + eos))
    return out


def tokenize_rows(ds, fmt: str, tokenizer, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row, truncated to max_seq_length; logs progress on large datasets."""
    if fmt in CHAT_FORMATS and cfg.message_format == "plain":
        ensure_chat_template(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    rows, done, total = iter(ds), 0, len(ds)
    started = last_log = time.monotonic()
    while chunk := list(itertools.islice(rows, 1000)):
        if fmt in CHAT_FORMATS:
            talks = [
                conversation(row, fmt, done + j, cfg.system_prompt, cfg.prompt_template)
                for j, row in enumerate(chunk)
            ]
            render = tokenize_messages if cfg.message_format == "plain" else format_messages
            pairs = [render(tokenizer, msgs, cfg) for msgs in talks]
        else:
            pairs = _pairs(chunk, done, fmt, tokenizer, cfg)
        for ids, labels in pairs:
            ids, labels = ids[: cfg.max_seq_length], labels[: cfg.max_seq_length]
            labels[0] = IGNORE_INDEX  # nothing predicts the first token; keeps packed samples apart
            out.append((ids, labels))
        done += len(chunk)
        now = time.monotonic()
        if now - last_log >= 10 and done < total:
            rate = done / (now - started)
            log.info(
                "tokenized %d/%d rows, %.0f rows/s, eta %.0f s", done, total, rate, (total - done) / rate
            )
            last_log = now
    return out


def pack(samples: list[tuple[list[int], list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy next-fit in order: append each sample to the current sequence, or start a new one when it
    would pass max_len tokens (earlier sequences are not revisited)."""
    packed: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "seq_lens": []}
    for ids, labels in samples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_len:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "seq_lens": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["seq_lens"].append(len(ids))
    if cur["input_ids"]:
        packed.append(cur)
    return packed


def _records(samples, packing: bool, max_len: int) -> list[dict[str, list[int]]]:
    if packing:
        return pack(samples, max_len)
    return [{"input_ids": ids, "labels": labels, "seq_lens": [len(ids)]} for ids, labels in samples]


def tokenized_samples(cfg: TrainConfig, tokenizer, cache_dir: str, dataset_dir: str, split: str):
    """The (input_ids, labels) of every row of one split that keeps a target token; and the format."""
    ds = load_rows(dataset_dir, cache_dir, split, cfg.dataset_source)
    ds = rename_columns(ds, cfg.column_map)
    fmt = detect_format(list(ds.column_names), cfg.dataset_format)
    samples = tokenize_rows(ds, fmt, tokenizer, cfg)
    kept = [s for s in samples if any(t != IGNORE_INDEX for t in s[1])]
    if not kept:
        raise TrainerError(
            f"no row has a target token left after truncation to max_seq_length={cfg.max_seq_length} "
            f"({dataset_dir}, {split}): raise max_seq_length or check the response fields"
        )
    if len(kept) < len(samples):
        log.warning(
            "dropped %d of %d rows with no target token within max_seq_length",
            len(samples) - len(kept),
            len(samples),
        )
    return kept, fmt


def each_dataset(cfg: TrainConfig) -> list[TrainConfig]:
    """The config of each training dataset: dataset_dir's, then each of more_datasets (its keys replaced)."""
    return [cfg, *(dataclasses.replace(cfg, **entry, more_datasets=[]) for entry in cfg.more_datasets)]


def build_splits(cfg: TrainConfig, tokenizer, cache_dir: str) -> dict[str, list[dict[str, list[int]]]]:
    """Tokenized (and packed) train and val records, from the raw dataset(s) (and the validation dataset)."""
    kept, formats = [], []
    for one in each_dataset(cfg):  # several datasets: concatenated in order, as torchtune's ConcatDataset
        samples, fmt = tokenized_samples(one, tokenizer, cache_dir, one.dataset_dir, one.dataset_split)
        kept += samples
        formats.append(fmt)
    fmt = "+".join(formats)
    if cfg.val_dataset_split:
        train = kept
        val, _ = tokenized_samples(
            cfg, tokenizer, cache_dir, cfg.val_dataset_dir or cfg.dataset_dir, cfg.val_dataset_split
        )
    else:
        train, val = split_train_val(kept, cfg)
    log.info("format %s: %d train, %d val samples", fmt, len(train), len(val))
    return {
        "train": _records(train, cfg.packing, cfg.max_seq_length),
        "val": _records(val, cfg.packing, cfg.max_seq_length),
    }


def split_train_val(samples: list, cfg: TrainConfig) -> tuple[list, list]:
    """A seeded shuffle, then `val_fraction` of the samples (at least one, never all) held out."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = round(cfg.val_fraction * len(samples)) if cfg.val_fraction else 0
    n_val = min(max(n_val, 1 if cfg.val_fraction else 0), len(samples) - 1)
    return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]


def cache_key(cfg: TrainConfig, tokenizer_dir: str) -> str:
    """Changes when the data files, the tokenizer or a setting that shapes the tokens changes (the files
    by files.dir_digest's rule; the weights, which do not shape the tokens, are left out)."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(
        f"{dir_digest(cfg.dataset_dir)}:{dir_digest(tokenizer_dir, skip_suffixes=('.safetensors',))}".encode()
    )
    settings = ("dataset_format", "max_seq_length", "packing", "train_on_prompt", "val_fraction", "seed")
    settings += ("dataset_split", "dataset_source", "column_map", "system_prompt")
    settings += ("objective",)
    if not cfg.add_eos:  # named only when set, so existing caches keep their key
        settings += ("add_eos",)
    if cfg.alpaca_preamble:  # named only when set, so existing caches keep their key
        settings += ("alpaca_preamble",)
    if cfg.prompt_template:  # named only when set, so existing caches keep their key
        settings += ("prompt_template",)
    if cfg.message_format != "plain":  # named only when set, so existing caches keep their key
        settings += ("message_format",)
    if cfg.more_datasets:  # named only when set, so existing caches keep their key
        settings += ("more_datasets",)
        for entry in cfg.more_datasets:
            root = Path(entry.get("dataset_dir", cfg.dataset_dir))
            for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
                if p.is_file() and ".cache" not in p.parts:
                    h.update(f"more/{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n".encode())
    if cfg.val_dataset_split:  # named only when set, so existing caches keep their key
        settings += ("val_dataset_dir", "val_dataset_split")
        for p in sorted(Path(cfg.val_dataset_dir).rglob("*")) if cfg.val_dataset_dir else []:
            if p.is_file() and ".cache" not in p.parts:
                h.update(f"val/{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n".encode())
    h.update(json.dumps({k: getattr(cfg, k) for k in settings}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_cache(splits: dict[str, list[dict[str, list[int]]]], path: Path) -> None:
    import datasets

    with atomic_dir(path, keep_existing=True) as tmp:  # another node may write the same cache first
        for name, records in splits.items():
            if not records:  # an empty split is an absent folder
                continue
            columns = {k: [r[k] for r in records] for k in records[0]}  # SFT or preference records
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / name))


def read_cache(path: Path) -> dict[str, Any]:
    import datasets

    return {
        name: datasets.load_from_disk(str(path / name)).with_format("python")
        if (path / name).exists()
        else []
        for name in ("train", "val")
    }


# ---------------------------------------------------------------- batches


def collate(records: list[dict[str, list[int]]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest record; packed batches also carry per-sample position ids.

    Unpacked batches need no attention mask: under causal attention a real token only sees earlier
    positions, which are all real when the padding is on the right, and padded positions are never
    targets. Without a mask (or position ids) the model runs plain causal attention, the fastest kind.
    """
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)
    for row, r in enumerate(records):
        n = len(r["input_ids"])
        ids[row, :n] = torch.tensor(r["input_ids"])
        labels[row, :n] = torch.tensor(r["labels"])
    batch = {"input_ids": ids, "labels": labels}
    if packing:
        positions = torch.zeros((len(records), width), dtype=torch.long)
        for row, r in enumerate(records):
            n = len(r["input_ids"])
            positions[row, :n] = torch.cat([torch.arange(k) for k in r["seq_lens"]])
            positions[row, n:] = torch.arange(width - n)  # padding is its own segment
        batch["position_ids"] = positions
    return batch


def count_targets(records: list[dict[str, list[int]]]) -> int:
    """Tokens that count in the loss (shifted: the label of position 0 is never used)."""
    return sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in records)


@dataclass(frozen=True)
class BatchPlan:
    """Which records each rank uses at each optimizer step: a pure function of (seed, step)."""

    num_records: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int
    # Optimizer steps of an epoch at most (torchtune's max_steps_per_epoch); 0: every full global batch.
    max_steps_per_epoch: int = 0
    # Token count of each record. When given, each rank's micro-batches group records of similar length,
    # which pads less; the loss is a sum over the whole global batch, so the result does not change.
    lengths: Sequence[int] | None = field(default=None, repr=False, compare=False)
    shuffle: bool = True  # False: every epoch in file order (torchtune's shuffle: False)

    def __post_init__(self) -> None:
        per_rank, rest = divmod(self.global_batch_size, self.micro_batch_size * self.world_size)
        if rest or not per_rank:
            raise TrainerError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x world size ({self.world_size}) = "
                f"{self.micro_batch_size * self.world_size}"
            )
        if self.steps_per_epoch == 0:
            raise TrainerError(
                f"only {self.num_records} training sequences, fewer than global_batch_size "
                f"({self.global_batch_size}): lower global_batch_size or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        full = self.num_records // self.global_batch_size
        return min(full, self.max_steps_per_epoch) if self.max_steps_per_epoch else full

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def global_batch(self, step: int) -> list[int]:
        """Record indices of optimizer step `step` (0-based), identical on every rank and world size."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self.shuffle:
            order = torch.randperm(
                self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch)
            )
        else:
            order = torch.arange(self.num_records)
        return order[i * self.global_batch_size : (i + 1) * self.global_batch_size].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's contiguous slice of the global batch in micro-batches (shortest first if `lengths`)."""
        per_rank = self.global_batch_size // self.world_size
        mine = self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        if self.lengths is not None:
            mine.sort(key=self.lengths.__getitem__)
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]

    def val_batches(self, num_val: int) -> list[list[int]]:
        """This rank's share of the validation records; -1 pads so all ranks run the same number of passes."""
        stride = self.micro_batch_size * self.world_size
        padded = list(range(num_val)) + [-1] * (-num_val % stride)
        return [
            padded[i + self.rank * self.micro_batch_size : i + (self.rank + 1) * self.micro_batch_size]
            for i in range(0, len(padded), stride)
        ]
