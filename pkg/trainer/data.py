"""Training data: load what the dataset initializer left, tokenize once, and make train and val records.

The steps, each in a module of its own: data_files (find and read the split's files), rows (a row as a
prompt and completion or as messages), chat_format (messages as tokens and labels), batching (packing and
the batch plan), data_cache (the tokenized records on disk).

Labels: prompt tokens are -100 unless `train_on_prompt`; the first token of every sample is never a target,
so packed samples never predict across their boundary.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from pkg.trainer.batching import to_records
from pkg.trainer.chat_format import ensure_chat_template, format_messages, format_text, tokenize_messages
from pkg.trainer.config import TrainConfig
from pkg.trainer.data_files import load_split
from pkg.trainer.errors import RowError, TrainerError, at_row
from pkg.trainer.loss import IGNORE_INDEX
from pkg.trainer.rows import (
    CHAT_FORMATS,
    conversation,
    detect_format,
    prompt_and_completion,
    rename_columns,
    with_system,
    with_system_text,
    wrapped,
)

log = logging.getLogger(__name__)


def tokenize_non_chat_rows(
    chunk: list[dict], lo: int, fmt: str, tokenizer, cfg: TrainConfig
) -> list[tuple[list[int], list[int]]]:
    """Tokenize a chunk of non-chat rows (batched through the fast tokenizer)."""
    if cfg.message_format != "plain" and fmt == "text":  # as the family's tokenizer encodes a text
        texts = [prompt_and_completion(row, fmt, lo + j)[1] for j, row in enumerate(chunk)]
        return [format_text(tokenizer, text, cfg) for text in texts]
    if cfg.message_format != "plain" and fmt != "text":  # a user message and the assistant's reply
        pairs = [prompt_and_completion(row, fmt, lo + j, cfg.alpaca_preamble) for j, row in enumerate(chunk)]
        talks = [
            with_system(
                [
                    {"role": "user", "content": p},  # format_messages applies prompt_template
                    {"role": "assistant", "content": c},
                ],
                cfg.system_message(),
            )
            for p, c in pairs
        ]
        return [at_row(lo + j, format_messages, tokenizer, msgs, cfg) for j, msgs in enumerate(talks)]
    with_eos = tokenizer.eos_token_id is not None and (fmt != "text" or cfg.add_eos)
    eos = [tokenizer.eos_token_id] if with_eos else []
    pairs = [prompt_and_completion(row, fmt, lo + j, cfg.alpaca_preamble) for j, row in enumerate(chunk)]
    if cfg.prompt_template and fmt != "text":
        pairs = [(wrapped(p, cfg.prompt_template), c) for p, c in pairs]
    pairs = [(with_system_text(p, cfg.system_prompt), c) for p, c in pairs]
    hide = bool(cfg.train_on_prompt and cfg.system_prompt)  # the system paragraph is never a target
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True, return_offsets_mapping=hide)
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for k, (p, c) in enumerate(zip(prompts["input_ids"], completions, strict=True)):
        if not cfg.train_on_prompt:
            prompt_labels = [IGNORE_INDEX] * len(p)
        elif hide:
            end = len(with_system_text("", cfg.system_prompt))
            offsets = prompts["offset_mapping"][k]
            prompt_labels = [IGNORE_INDEX if a < end else t for t, (a, _) in zip(p, offsets, strict=True)]
        else:
            prompt_labels = list(p)
        out.append((p + c + eos, prompt_labels + c + eos))
    return out


def tokenize_rows(ds, fmt: str, tokenizer, cfg: TrainConfig) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row, truncated to max_seq_length; logs progress on large datasets."""
    if fmt in CHAT_FORMATS and cfg.message_format == "plain":
        ensure_chat_template(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    plain_template = cfg.prompt_template if cfg.message_format == "plain" else ""  # else format_messages's
    rows, done, total = iter(ds), 0, len(ds)
    started = last_log = time.monotonic()
    while chunk := list(itertools.islice(rows, 1000)):
        if fmt in CHAT_FORMATS:
            talks = [
                conversation(row, fmt, done + j, cfg.system_message(), plain_template, cfg.validate_messages)
                for j, row in enumerate(chunk)
            ]
            render = tokenize_messages if cfg.message_format == "plain" else format_messages
            pairs = [at_row(done + j, render, tokenizer, msgs, cfg) for j, msgs in enumerate(talks)]
        else:
            pairs = tokenize_non_chat_rows(chunk, done, fmt, tokenizer, cfg)
        for k, (ids, labels) in enumerate(pairs):
            check_length(len(ids), done + k, cfg)
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


def check_length(n: int, i: int, cfg: TrainConfig) -> None:
    """Without truncation (torchtune's tokenizer.max_seq_len null), a sample longer than max_seq_length
    (then the model's context) stops the run: torchtune's model fails on positions past its own."""
    if cfg.truncation == "none" and n > cfg.max_seq_length:
        raise RowError(
            i,
            f" is {n} tokens, more than the model's {cfg.max_seq_length} positions, and "
            "tokenizer.max_seq_len is null (no truncation): set tokenizer.max_seq_len to truncate, or drop "
            "the row",
        )


def tokenized_samples(
    cfg: TrainConfig, tokenizer, cache_dir: str, dataset_dir: str, split: str, limit: int = 0
):
    """The (input_ids, labels) of every row (or of the first `limit`) of one split, and the format.

    A row with no target token left (its prompt fills max_seq_length, train_on_prompt off) stays, as
    torchtune's SFT datasets keep it: it counts in the rows and the steps per epoch and adds nothing to
    the loss or its token count. Unpacked, only its first token is kept, which holds its place in a batch
    without a forward pass over the rest; packed, it fills its space in a sequence as in PackedDataset."""
    ds, origins = load_split(dataset_dir, cache_dir, split, cfg.dataset_source)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    ds = rename_columns(ds, cfg.column_map)
    fmt = detect_format(list(ds.column_names), cfg.dataset_format)
    try:
        samples = tokenize_rows(ds, fmt, tokenizer, cfg)
    except RowError as exc:  # named by its file and line
        raise origins.error(exc) from None
    except TrainerError as exc:  # say which data it is about
        raise TrainerError(f"{dataset_dir} ({split}): {exc}") from None
    empty = [i for i, (_, labels) in enumerate(samples) if all(t == IGNORE_INDEX for t in labels)]
    if len(empty) == len(samples):
        raise TrainerError(
            f"no row has a target token left after truncation to max_seq_length={cfg.max_seq_length} "
            f"({dataset_dir}, {split}): raise max_seq_length or check the response fields"
        )
    if empty:
        log.warning(
            "%d of %d rows have no target token within max_seq_length=%d: kept, as torchtune keeps them "
            "(they count in the rows and steps, and add nothing to the loss)",
            len(empty),
            len(samples),
            cfg.max_seq_length,
        )
    if not cfg.packing:
        for i in empty:
            samples[i] = samples[i][0][:1], samples[i][1][:1]
    return samples, fmt


def each_dataset(cfg: TrainConfig) -> list[TrainConfig]:
    """The config of each training dataset: dataset_dir's, then each of more_datasets (its keys replaced)."""
    return [cfg, *(dataclasses.replace(cfg, **entry, more_datasets=[]) for entry in cfg.more_datasets)]


def build_splits(cfg: TrainConfig, tokenizer, cache_dir: str) -> dict[str, list[dict[str, list[int]]]]:
    """Tokenized (and packed) train and val records, from the raw dataset(s) (and the validation dataset)."""
    samples, formats = [], []
    for one in each_dataset(cfg):  # several datasets: concatenated in order, as torchtune's ConcatDataset
        part, fmt = tokenized_samples(one, tokenizer, cache_dir, one.dataset_dir, one.dataset_split)
        samples += part
        formats.append(fmt)
    fmt = "+".join(formats)
    if cfg.val_dataset_split:
        train = samples
        val, _ = tokenized_samples(
            cfg, tokenizer, cache_dir, cfg.val_dataset_dir or cfg.dataset_dir, cfg.val_dataset_split
        )
    else:
        train, val = split_train_val(samples, cfg)
    log.info("format %s: %d train, %d val samples", fmt, len(train), len(val))
    return {
        "train": to_records(train, cfg.packing, cfg.max_seq_length),
        "val": to_records(val, cfg.packing, cfg.max_seq_length),
    }


def split_train_val(samples: list, cfg: TrainConfig) -> tuple[list, list]:
    """`val_fraction` of the samples (at least one, never all), picked by a seeded shuffle, held out; the
    training samples stay in file order (shuffle: false trains in it)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = round(cfg.val_fraction * len(samples)) if cfg.val_fraction else 0
    n_val = min(max(n_val, 1 if cfg.val_fraction else 0), len(samples) - 1)
    held = set(order[:n_val])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in order[:n_val]]
