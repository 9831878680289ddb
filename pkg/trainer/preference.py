"""Preference pairs for DPO (`objective: dpo`): read, tokenize and batch prompt/chosen/rejected rows.

- Row forms, detected from the columns and the first row:
  strings: `prompt`, `chosen`, `rejected` (the prompt gets the tokenizer's special tokens, each response
  an end-of-sequence token, as in SFT's prompt/completion rows);
  conversational: `chosen` and `rejected` are message lists (the form of most Hub preference sets); the
  prompt is their shared leading turns, or a `prompt` message list when the set has one. Rendered with the
  model's chat template; a set in this form for a tokenizer without a template is refused.
- message_format other than plain: both forms as torchtune 0.6.1's preference dataset tokenizes them, each
  response's conversation through the family's tokenize_messages (chat_format.format_messages).
- `system_prompt`, as in SFT: the system message of a conversational prompt (replacing its own), the first
  paragraph of a string prompt.
- A record keeps the prompt once: `prompt_ids`, `chosen_ids`, `rejected_ids` (the response tokens, end marks
  included), `prompt_targets` (the indices of prompt tokens that are targets of both responses: earlier
  assistant turns in the family formats, as torchtune trains them) and `seq_lens` (the lengths of the chosen
  and rejected sequences, for the batch plan).
- Truncation: the family formats cut each conversation at its end (torchtune's tokenize_messages with
  tokenizer.max_seq_len), and so does `truncation: torchtune` (tune run) for rows rendered plain; otherwise,
  when prompt + the longer response exceed `max_seq_length`, the prompt loses its beginning (the responses,
  which the loss is about, stay whole; one longer than max_seq_length - 1 loses its end). Every row stays a
  pair, as in torchtune's preference dataset: one whose prompt fills max_seq_length has no response token
  and scores log-probability 0 on both sides (dpo.py: loss ln 2, no gradient), so the pairs and steps
  are the rows', whatever max_seq_length. Both counts are logged. Without truncation (tune run's
  null tokenizer.max_seq_len) a pair longer than max_seq_length stops the run, naming its row.
- Batches: `collate_pairs` puts the chosen sequences then the rejected ones into one padded batch, so a
  micro-batch needs one forward pass; labels are -100 but on response tokens.
"""

from __future__ import annotations

import logging

import torch

from pkg.trainer import data
from pkg.trainer.chat_format import format_messages
from pkg.trainer.config import TrainConfig
from pkg.trainer.data_files import load_split
from pkg.trainer.errors import RowError, TrainerError, at_row
from pkg.trainer.loss import IGNORE_INDEX
from pkg.trainer.rows import plain_messages, rename_columns, with_system, with_system_text

log = logging.getLogger(__name__)

RESPONSES = ("chosen", "rejected")
EXPECTED = (
    "prompt/chosen/rejected strings, or chosen/rejected message lists (with an optional prompt message list)"
)


def check_columns(columns: list[str]) -> None:
    missing = [c for c in RESPONSES if c not in columns]
    if missing:
        raise TrainerError(
            f"objective dpo needs preference columns but the dataset has no {' or '.join(missing)} "
            f"(columns: {', '.join(columns)}); expected {EXPECTED}"
        )


def is_chat(row: dict) -> bool:
    return isinstance(row.get("chosen"), list)


# ---------------------------------------------------------------- rows -> (prompt, chosen, rejected) text


def _string(row: dict, key: str, i: int) -> str:
    value = row.get(key)
    if value is None:
        raise RowError(i, f" has no '{key}' (preference rows need {EXPECTED})")
    if not isinstance(value, str):
        raise RowError(i, f": '{key}' must be a string like the other rows', got {type(value).__name__}")
    if key in RESPONSES and not value.strip():
        raise RowError(i, f": the '{key}' response is empty")
    return value


def _message_list(row: dict, key: str, i: int) -> list[dict]:
    msgs = row.get(key)
    if msgs is None:
        raise RowError(i, f" has no '{key}' (preference rows need {EXPECTED})")
    if isinstance(msgs, str) and key == "prompt":  # a plain-text prompt before conversational responses
        return [{"role": "user", "content": msgs}]
    if not isinstance(msgs, list):
        raise RowError(i, f": '{key}' must be a list of messages like the other rows'")
    return plain_messages(msgs, i, f"every message of '{key}'")


def chat_turns(row: dict, i: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt turns, chosen turns, rejected turns) of a conversational row."""
    chosen, rejected = _message_list(row, "chosen", i), _message_list(row, "rejected", i)
    if row.get("prompt") is not None:
        prompt = _message_list(row, "prompt", i)
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:  # full conversations
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not prompt:
        raise RowError(i, ": chosen and rejected share no prompt turn (and there is no 'prompt')")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or not any(m["content"].strip() for m in turns):
            raise RowError(i, f": the '{key}' response is empty")
    return prompt, chosen, rejected


def render_chat(tokenizer, prompt: list[dict], response: list[dict], i: int) -> tuple[str, str]:
    """(prompt text, response text): the conversation rendered once, split where the response starts."""
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    for generation_prompt in (True, False):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=generation_prompt)
        if full.startswith(head) and len(full) > len(head):
            return head, full[len(head) :]
    raise RowError(
        i,
        ": the model's chat template renders the prompt turns differently once a response follows, "
        "so the response tokens cannot be told apart; give prompt/chosen/rejected as strings",
    )


# ---------------------------------------------------------------- tokenizing


def _plain_pairs(rows: list[dict], lo: int, chat: bool, tokenizer, cfg: TrainConfig) -> list[tuple]:
    """(prompt, chosen, rejected) ids of rows rendered plain: the chat template, or prompt, response, EOS."""
    texts = []
    for j, row in enumerate(rows):
        if chat:
            prompt, chosen, rejected = chat_turns(row, lo + j)
            prompt = with_system(prompt, cfg.system_message())
            head, c = render_chat(tokenizer, prompt, chosen, lo + j)
            head_r, r = render_chat(tokenizer, prompt, rejected, lo + j)
            if head_r != head:
                raise RowError(
                    lo + j,
                    ": the chat template renders the prompt of chosen and of rejected "
                    "differently; give prompt/chosen/rejected as strings",
                )
            texts.append((head, c, r))
        else:
            text = [_string(row, k, lo + j) for k in ("prompt", "chosen", "rejected")]
            texts.append((with_system_text(text[0], cfg.system_message()), text[1], text[2]))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not chat else []
    prompts = tokenizer([t[0] for t in texts], add_special_tokens=not chat)["input_ids"]
    chosen = tokenizer([t[1] for t in texts], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([t[2] for t in texts], add_special_tokens=False)["input_ids"]
    return [(p, c + eos, r + eos, []) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def _family_pair(row: dict, i: int, chat: bool, tokenizer, cfg: TrainConfig) -> tuple[list[int], ...]:
    """(prompt, chosen, rejected, prompt targets) as torchtune's preference dataset makes them: each
    response's whole conversation through the family's tokenize_messages (cut at its end to max_seq_length,
    the tokenizer's truncation), prompt turns no target (ChosenRejectedToMessages; string rows: a user and an
    assistant message). The response is the last run of targets; the prompt, everything before it; its
    targets (earlier assistant turns) are the indices of the prompt tokens that are targets of both
    responses, as in torchtune; tokens after the last target predict none."""
    if chat:
        prompt, chosen, rejected = chat_turns(row, i)
    else:
        text = [_string(row, k, i) for k in ("prompt", "chosen", "rejected")]
        prompt = [{"role": "user", "content": text[0]}]
        chosen, rejected = (
            [{"role": "assistant", "content": text[1]}],
            [{"role": "assistant", "content": text[2]}],
        )
    prompt = with_system(prompt, cfg.system_message())
    out = []
    for response in (chosen, rejected):
        ids, labels = at_row(i, format_messages, tokenizer, prompt + response, cfg)
        last = max((k for k, t in enumerate(labels) if t != IGNORE_INDEX), default=-1)
        if last < 0:  # the prompt fills max_seq_length: no target (the pair is kept, as torchtune keeps it)
            out.append((ids, [], []))
            continue
        first = last
        while first > 0 and labels[first - 1] != IGNORE_INDEX:
            first -= 1
        # token 0 predicts nothing (as torchtune's shifted labels)
        targets = [k for k in range(1, first) if labels[k] != IGNORE_INDEX]
        out.append((ids[:first], ids[first : last + 1], targets))
    (head, c, targets), (head_r, r, targets_r) = out
    if head != head_r or targets != targets_r:
        raise RowError(
            i,
            ": chosen and rejected differ before their last assistant turn; a pair shares every turn "
            "but the last one",
        )
    return head, c, r, targets


def tokenize_pairs(ds, tokenizer, cfg: TrainConfig) -> tuple[list[dict], int, int]:
    """Records of every row (see the module doc); returns (records, truncated pairs, pairs with a side
    without response tokens)."""
    check_columns(list(ds.column_names))
    chat = is_chat(ds[0])
    family = cfg.message_format != "plain"
    if chat and not family and not getattr(tokenizer, "chat_template", None):
        raise TrainerError(
            f"the dataset's chosen/rejected are message lists but the tokenizer in {cfg.model_dir} has no "
            "chat template: add chat_template to its tokenizer_config.json, or give prompt/chosen/rejected "
            "as strings"
        )
    if not chat and "prompt" not in ds.column_names:
        raise TrainerError(
            f"objective dpo: chosen/rejected are strings, so a 'prompt' column is needed "
            f"(columns: {', '.join(ds.column_names)})"
        )
    records, truncated, empty = [], 0, 0
    for lo in range(0, len(ds), 1000):
        chunk = ds[lo : lo + 1000]
        rows = [{k: chunk[k][j] for k in chunk} for j in range(len(chunk["chosen"]))]
        for j, row in enumerate(rows):
            if is_chat(row) != chat:
                raise RowError(lo + j, ": mixes string and message-list rows; use one form")
        if family:
            pairs = [_family_pair(row, lo + j, chat, tokenizer, cfg) for j, row in enumerate(rows)]
        else:
            pairs = _plain_pairs(rows, lo, chat, tokenizer, cfg)
        for j, (p, c, r, targets) in enumerate(pairs):
            data.check_length(len(p) + max(len(c), len(r)), lo + j, cfg)
            longest = max(len(c), len(r))
            if cfg.truncation == "torchtune":  # each sequence cut at its end (rendered plain; a family's are)
                room = max(cfg.max_seq_length - len(p), 0)
                shortened = longest > room
            else:  # the responses whole, unless one leaves no room for the prompt's last token
                room = cfg.max_seq_length - 1
                shortened = longest > room or len(p) + longest > cfg.max_seq_length
            c, r = c[:room], r[:room]
            if not c or not r:  # kept, as torchtune keeps it: log-probability 0 on a side without tokens
                empty += 1
                if not (c or r or targets):  # nothing to score: one token runs through the model
                    p = p[-1:]
            if not p:
                raise RowError(
                    lo + j,
                    ": the prompt is empty and the tokenizer adds no BOS token, so nothing "
                    "predicts the responses' first token: give every pair a prompt",
                )
            budget = cfg.max_seq_length - max(len(c), len(r))
            if len(p) > budget:  # the prompt loses its beginning (a family's fits: cut when rendered)
                cut = len(p) - budget
                p = p[cut:]
                targets = [k - cut for k in targets if k > cut]
            truncated += shortened
            records.append(
                {
                    "prompt_ids": p,
                    "chosen_ids": c,
                    "rejected_ids": r,
                    # IPO's per-token means would change with them (its loss; DPO's sums cancel them)
                    "prompt_targets": targets if cfg.dpo_loss == "sigmoid" else [],
                    "seq_lens": [len(p) + len(c), len(p) + len(r)],
                }
            )
    if all(not (r["chosen_ids"] or r["rejected_ids"] or r["prompt_targets"]) for r in records):
        raise TrainerError(
            f"no preference pair has a response token within max_seq_length={cfg.max_seq_length} (the "
            "prompts fill it): raise max_seq_length"
        )
    return records, truncated, empty


def tokenized_pairs(cfg: TrainConfig, tokenizer, cache_dir: str, dataset_dir: str, split: str) -> list[dict]:
    """The tokenized pairs of one split, one per row."""
    ds, origins = load_split(dataset_dir, cache_dir, split, cfg.dataset_source)
    ds = rename_columns(ds, cfg.column_map)
    try:
        records, truncated, empty = tokenize_pairs(ds, tokenizer, cfg)
    except RowError as exc:  # named by its file and line
        raise origins.error(exc) from None
    if truncated:
        how = "at their end" if cfg.truncation == "torchtune" else "(prompts first, at their beginning)"
        log.warning(
            "truncated %d of %d pairs %s to fit max_seq_length=%d",
            truncated,
            len(ds),
            how,
            cfg.max_seq_length,
        )
    if empty:
        log.warning(
            "%d of %d pairs have no chosen or rejected token within max_seq_length=%d; kept, as torchtune "
            "keeps them: a side without tokens has log-probability 0 (a pair with neither: loss ln 2, no "
            "gradient)", empty, len(ds), cfg.max_seq_length,
        )  # fmt: skip
    return records


def build_splits(cfg: TrainConfig, tokenizer, cache_dir: str) -> dict[str, list[dict]]:
    """Tokenized preference records, split into train and val like the SFT samples."""
    records = []
    for one in data.each_dataset(cfg):  # several datasets: concatenated in order
        records += tokenized_pairs(one, tokenizer, cache_dir, one.dataset_dir, one.dataset_split)
    if cfg.val_dataset_split:
        val_dir = cfg.val_dataset_dir or cfg.dataset_dir
        train, val = records, tokenized_pairs(cfg, tokenizer, cache_dir, val_dir, cfg.val_dataset_split)
    else:
        train, val = data.split_train_val(records, cfg)
    log.info("format preference: %d train, %d val pairs", len(train), len(val))
    return {"train": train, "val": val}


# ---------------------------------------------------------------- batches


def collate_pairs(records: list[dict], shared_prompt: bool = True) -> dict[str, torch.Tensor]:
    """One model input for the chosen and the rejected response of every pair, and where their targets are.

    shared_prompt (the default where the attention accepts a custom mask, SDPA): one row per pair,
    `prompt + chosen + rejected`, with the rejected tokens at the positions they would have right after the
    prompt and a mask that hides the chosen tokens from them. The prompt runs through the model once instead
    of twice: on pairs whose prompt is as long as the responses, a third fewer tokens.
    Otherwise: two rows per pair (prompt + chosen, prompt + rejected), right-padded, plain causal attention.
    A record's `prompt_targets` (earlier assistant turns) count for both responses, as in torchtune: the
    same log-probabilities on both sides, so DPO's loss is the same with or without them, not the rewards.

    Returns input_ids [N, L] (plus position_ids and a boolean attention_mask [N, 1, L, L] when shared);
    `rows`, `positions`, `targets`: for output row r (the B chosen responses, then the B rejected ones),
    target j (the prompt's, then the response's tokens) is `targets[r, j]`, predicted at `positions[r, j]`
    of input row `rows[r]` (-100 pads).
    Padding tokens repeat the row's last token; they are never targets nor seen by a real token.
    """
    b = len(records)
    starts = []  # per output row: input row, first predictor position, position of the response's tokens
    seqs = []
    if shared_prompt:
        for i, r in enumerate(records):
            p, c = len(r["prompt_ids"]), len(r["chosen_ids"])
            seqs.append(r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"])
            starts.append((i, p, p))
        starts += [
            (i, len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r["chosen_ids"]))
            for i, r in enumerate(records)
        ]
    else:
        for key in ("chosen_ids", "rejected_ids"):
            seqs += [r["prompt_ids"] + r[key] for r in records]
        starts = [(i, len(r["prompt_ids"]), len(r["prompt_ids"])) for i, r in enumerate(records * 2)]
    shared = [r["prompt_targets"] for r in records] * 2  # indices into the prompt
    responses = [r["chosen_ids"] for r in records] + [r["rejected_ids"] for r in records]
    width = max(len(x) for x in seqs)
    longest = max(len(k) + len(x) for k, x in zip(shared, responses, strict=True))
    ids = torch.tensor([x + [x[-1]] * (width - len(x)) for x in seqs], dtype=torch.long)
    positions = torch.zeros((2 * b, longest), dtype=torch.long)
    targets = torch.full((2 * b, longest), IGNORE_INDEX, dtype=torch.long)
    for out, ((_, prompt_len, at), own, response) in enumerate(zip(starts, shared, responses, strict=True)):
        m, n = len(own), len(response)
        if m:  # prompt token k follows token k - 1
            targets[out, :m] = torch.tensor([records[out % b]["prompt_ids"][k] for k in own])
            positions[out, :m] = torch.tensor(own) - 1
        if n:  # token 0 follows the last prompt token; token j > 0 follows token j - 1 (at `at + j - 1`)
            targets[out, m : m + n] = torch.tensor(response)
            positions[out, m] = prompt_len - 1
            positions[out, m + 1 : m + n] = torch.arange(at, at + n - 1)
    batch = {"input_ids": ids, "rows": torch.tensor([row for row, _, _ in starts]), "positions": positions}
    batch["targets"] = targets
    if shared_prompt:
        pos = torch.arange(width).repeat(b, 1)
        mask = torch.ones((b, width, width), dtype=torch.bool).tril()
        for i, r in enumerate(records):
            p, c, n = len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])
            pos[i, p + c : p + c + n] -= c  # the rejected response starts right after the prompt
            mask[i, p + c :, p : p + c] = False  # ... and never sees the chosen one
        batch["position_ids"], batch["attention_mask"] = pos, mask.unsqueeze(1)
    return batch


def count_tokens(records: list[dict]) -> int:
    """Tokens of both sequences of every pair (the prompt twice, whatever the layout); the tokens/s unit."""
    return sum(sum(r["seq_lens"]) for r in records)
