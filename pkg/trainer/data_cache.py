"""The tokenized dataset's cache: its key, and writing and reading it.

Rank 0 tokenizes into `output_dir/cache/tokenized-<key>/` (a temporary folder, then renamed), and so does
each node's first rank where output_dir is not shared across nodes; the other ranks wait and read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pkg.trainer.config import TrainConfig
from pkg.trainer.files import atomic_dir, dir_digest

CACHE_VERSION = "3"  # bumped when the same settings tokenize differently (2: system_prompt on DPO pairs;
# 3: system_prompt never a target, prompt_template pieces encoded apart in message formats)


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
