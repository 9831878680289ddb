"""The tokenized dataset's cache: its key, and writing and reading it.

Rank 0 tokenizes into `output_dir/cache/tokenized-<key>/` (a temporary folder, then renamed), and so does
each node's first rank where output_dir is not shared across nodes; the other ranks wait and read it.

One file per split, `<split>.pt`: each column (input_ids, labels, seq_lens; a preference pair's prompt_ids,
chosen_ids, rejected_ids) as one flat int32 tensor with the offsets of its records. torch reads it memory
mapped, so a rank's resident memory holds the records it touches, and training needs neither `datasets` nor
pyarrow (~80 MiB resident once imported, for the whole run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from pkg.trainer.config import TrainConfig
from pkg.trainer.files import atomic_dir, dir_digest

CACHE_VERSION = "8"  # bumped when the same settings tokenize differently (2: system_prompt on DPO pairs;
# 3: system_prompt never a target, prompt_template pieces encoded apart in message formats; 4: text rows in
# message formats, and the cache's files became torch columns; 5: prompt_targets of DPO pairs, Qwen's EOS
# with a max_seq_len, Gemma's user-defined tokens in text; 6: DPO pairs without a response token kept;
# 7: SFT rows without a target token kept; 8: CSV cells read as text, a JSON value deep in a large file
# no longer cast to the type of the file's first 10 MiB)


# Settings that shape the tokens, added after the first caches and checkpoints: the cache key and the run
# fingerprint name each only where it differs from its default, so caches and checkpoints made before it keep
# their key and fingerprint.
LATER_TOKEN_SETTINGS = ("add_eos", "alpaca_preamble", "prompt_template", "message_format", "truncation",
                        "empty_system_prompt", "validate_messages")  # fmt: skip


def set_later_settings(cfg: TrainConfig) -> dict[str, object]:
    """{name: value} of the LATER_TOKEN_SETTINGS that differ from TrainConfig's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {name: getattr(cfg, name) for name in LATER_TOKEN_SETTINGS if getattr(cfg, name) != defaults[name]}


def cache_key(cfg: TrainConfig, tokenizer_dir: str) -> str:
    """Changes when the data files, the tokenizer or a setting that shapes the tokens changes (every folder
    by files.dir_digest's rule, by content; the weights, which do not shape the tokens, are left out)."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(
        f"{dir_digest(cfg.dataset_dir)}:{dir_digest(tokenizer_dir, skip_suffixes=('.safetensors',))}".encode()
    )
    settings = ("dataset_format", "max_seq_length", "packing", "train_on_prompt", "val_fraction", "seed")
    settings += ("dataset_split", "dataset_source", "column_map", "system_prompt")
    settings += ("objective", *set_later_settings(cfg))
    if cfg.objective == "dpo" and cfg.dpo_loss != "sigmoid":  # named only when set (prompt_targets)
        settings += ("dpo_loss",)
    if cfg.more_datasets:  # named only when set, so existing caches keep their key
        settings += ("more_datasets",)
        for entry in cfg.more_datasets:
            h.update(f"more/{dir_digest(entry.get('dataset_dir', cfg.dataset_dir))}\n".encode())
    if cfg.val_dataset_split:  # named only when set, so existing caches keep their key
        settings += ("val_dataset_dir", "val_dataset_split")
        if cfg.val_dataset_dir:
            h.update(f"val/{dir_digest(cfg.val_dataset_dir)}\n".encode())
    h.update(json.dumps({k: getattr(cfg, k) for k in settings}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_cache(splits: dict[str, list[dict[str, list[int]]]], path: Path) -> None:
    with atomic_dir(path, keep_existing=True) as tmp:  # another node may write the same cache first
        for name, records in splits.items():
            if not records:  # an empty split is an absent file
                continue
            columns = {}
            for key in records[0]:  # SFT or preference records: lists of token ids (or of lengths)
                lengths = torch.tensor([len(r[key]) for r in records], dtype=torch.int64)
                columns[key] = torch.tensor([v for r in records for v in r[key]], dtype=torch.int32)
                columns[f"{key}.offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            torch.save(columns, tmp / f"{name}.pt")


def read_cache(path: Path) -> dict[str, TokenizedSplit | list]:
    return {
        name: TokenizedSplit(torch.load(path / f"{name}.pt", mmap=True, weights_only=True))
        if (path / f"{name}.pt").exists()
        else []
        for name in ("train", "val")
    }


class TokenizedSplit(Sequence):
    """The records of one split: `split[i]` is a record (a dict of int lists); `split["seq_lens"]` is a
    column (a list with each record's list)."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns
        self.keys = [k for k in columns if not k.endswith(".offsets")]
        self.size = len(columns[f"{self.keys[0]}.offsets"]) - 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, str):
            values, offsets = self.columns[index].tolist(), self.columns[f"{index}.offsets"].tolist()
            return [values[a:b] for a, b in itertools.pairwise(offsets)]
        if not -self.size <= index < self.size:
            raise IndexError(f"record {index} of {self.size}")
        return {k: self._values(k, index % self.size) for k in self.keys}

    def _values(self, key: str, i: int) -> list[int]:
        start, end = self.columns[f"{key}.offsets"][i : i + 2].tolist()
        return self.columns[key][start:end].tolist()
