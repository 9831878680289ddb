"""Training data: load what the dataset initializer left, tokenize once, pack, and plan the batches.

- Files: json, jsonl, parquet, csv, arrow, a `save_to_disk` folder, or a Hub snapshot (`data/train-*.parquet`;
  the split comes from the file or folder name, and only `train` is trained on).
- Formats (`dataset_format`, or detected from the columns): alpaca (instruction/input/output), messages
  (role/content, rendered with the tokenizer's chat template), prompt_completion, text.
- Labels: prompt tokens are -100 unless `train_on_prompt`; the first token of every sample is never a
  target, so packed samples never predict across their boundary.
- Packing: samples are concatenated into sequences of at most `max_seq_length` tokens, each with its own
  position ids (0, 1, ... per sample); transformers turns restarting position ids into a block-diagonal mask.
- Cache: rank 0 tokenizes into `output_dir/cache/tokenized-<key>/` (a temporary folder, then renamed); the
  other ranks wait and read it.
- Batch plan: the samples of optimizer step k are a pure function of (seed, k), whatever the world size;
  each rank takes its contiguous slice and splits it into micro-batches.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_VERSION = "1"
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SPLITS = ("train", "validation", "valid", "test", "dev", "eval")
FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
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


def find_train_files(dataset_dir: Path) -> tuple[str, list[str]]:
    """The `datasets` builder and the data files of the train split."""
    files = sorted(
        p
        for p in dataset_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    if not files:
        raise TrainerError(
            f"no data files in {dataset_dir}: expected json, jsonl, parquet, csv, arrow files "
            "or a save_to_disk folder"
        )
    by_split = {p: _split_of(p.relative_to(dataset_dir)) for p in files}
    chosen = [p for p, s in by_split.items() if s == "train"] or [p for p, s in by_split.items() if s is None]
    if not chosen:
        raise TrainerError(f"no train split in {dataset_dir}: found only {sorted(set(by_split.values()))}")
    builders = {BUILDERS[p.suffix.lower()] for p in chosen}
    if len(builders) > 1:
        raise TrainerError(f"mixed file types in {dataset_dir} ({', '.join(sorted(builders))}): keep one")
    return builders.pop(), [str(p) for p in chosen]


def load_rows(dataset_dir: str, cache_dir: str):
    """The training rows as a `datasets.Dataset`."""
    import datasets

    root = Path(dataset_dir)
    if not root.is_dir():
        raise TrainerError(f"dataset_dir {root} does not exist or is not a folder")
    datasets.disable_progress_bars()
    try:
        if (root / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(root))
            if "train" not in loaded:
                raise TrainerError(f"{root} has splits {list(loaded)} but no 'train'")
            ds = loaded["train"]
        elif (root / "state.json").exists():
            ds = datasets.load_from_disk(str(root))
        else:
            builder, files = find_train_files(root)
            ds = datasets.load_dataset(
                builder, data_files={"train": files}, split="train", cache_dir=cache_dir
            )
    except TrainerError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files
        raise TrainerError(f"cannot read the dataset in {root}: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise TrainerError(f"the dataset in {root} has no rows")
    return ds


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
        "instruction/input/output, messages, prompt/completion or text (or set dataset_format)"
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


def prompt_and_completion(row: dict, fmt: str, i: int) -> tuple[str, str]:
    """The untrained prefix and the trained continuation of one non-chat row."""
    if fmt == "alpaca":
        extra = _text(row, "input", i, fmt, required=False)
        prompt = ALPACA_PROMPT.format(
            instruction=_text(row, "instruction", i, fmt), input=f"### Input:\n{extra}\n\n" if extra else ""
        )
        return prompt, _text(row, "output", i, fmt)
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


def _messages(row: dict, i: int) -> list[dict]:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise TrainerError(f"row {i} has no 'messages' list")
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TrainerError(f"row {i}: every message needs a string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise TrainerError(f"row {i}: no 'assistant' message to train on")
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


def _pairs(
    chunk: list[dict], lo: int, fmt: str, tokenizer, cfg: TrainConfig
) -> list[tuple[list[int], list[int]]]:
    """Tokenize a chunk of non-chat rows (batched through the fast tokenizer)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pairs = [prompt_and_completion(row, fmt, lo + j) for j, row in enumerate(chunk)]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids = p + c + eos
        out.append((ids, list(ids) if cfg.train_on_prompt else [IGNORE_INDEX] * len(p) + c + eos))
    return out


def tokenize_rows(ds, fmt: str, tokenizer, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row, truncated to max_seq_length; logs progress on large datasets."""
    if fmt == "messages":
        ensure_chat_template(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    rows, done, total = iter(ds), 0, len(ds)
    started = last_log = time.monotonic()
    while chunk := list(itertools.islice(rows, 1000)):
        if fmt == "messages":
            pairs = [
                tokenize_messages(tokenizer, _messages(row, done + j), cfg) for j, row in enumerate(chunk)
            ]
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
    """Greedy first-fit in order: concatenate samples into sequences of at most max_len tokens."""
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


def build_splits(cfg: TrainConfig, tokenizer, cache_dir: str) -> dict[str, list[dict[str, list[int]]]]:
    """Tokenized (and packed) train and val records, from the raw dataset."""
    ds = load_rows(cfg.dataset_dir, cache_dir)
    fmt = detect_format(list(ds.column_names), cfg.dataset_format)
    samples = tokenize_rows(ds, fmt, tokenizer, cfg)
    kept = [s for s in samples if any(t != IGNORE_INDEX for t in s[1])]
    if not kept:
        raise TrainerError(
            f"no row has a target token left after truncation to max_seq_length={cfg.max_seq_length}: "
            "raise max_seq_length or check the response fields"
        )
    if len(kept) < len(samples):
        log.warning(
            "dropped %d of %d rows with no target token within max_seq_length",
            len(samples) - len(kept),
            len(samples),
        )
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = round(cfg.val_fraction * len(kept)) if cfg.val_fraction else 0
    n_val = min(max(n_val, 1 if cfg.val_fraction else 0), len(kept) - 1)
    val = [kept[i] for i in order[:n_val]]
    train = [kept[i] for i in order[n_val:]]
    log.info("format %s: %d rows -> %d train, %d val samples", fmt, len(ds), len(train), len(val))
    return {
        "train": _records(train, cfg.packing, cfg.max_seq_length),
        "val": _records(val, cfg.packing, cfg.max_seq_length),
    }


def cache_key(cfg: TrainConfig, tokenizer_dir: str) -> str:
    """Changes when the data files, the tokenizer or a setting that shapes the tokens changes."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for root in (Path(cfg.dataset_dir), Path(tokenizer_dir)):
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(".safetensors") and ".cache" not in p.parts:
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    settings = ("dataset_format", "max_seq_length", "packing", "train_on_prompt", "val_fraction", "seed")
    h.update(json.dumps({k: getattr(cfg, k) for k in settings}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_cache(splits: dict[str, list[dict[str, list[int]]]], path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        for name, records in splits.items():
            if not records:  # an empty split is an absent folder
                continue
            columns = {k: [r[k] for r in records] for k in ("input_ids", "labels", "seq_lens")}
            datasets.Dataset.from_dict(columns).save_to_disk(str(tmp / name))
        try:
            os.rename(tmp, path)
        except OSError:  # another node wrote the same cache first
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    # Token count of each record. When given, each rank's micro-batches group records of similar length,
    # which pads less; the loss is a sum over the whole global batch, so the result does not change.
    lengths: Sequence[int] | None = field(default=None, repr=False, compare=False)

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
        return self.num_records // self.global_batch_size

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        """Record indices of optimizer step `step` (0-based), identical on every rank and world size."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch))
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
