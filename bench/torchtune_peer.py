"""A torchtune ModelTokenizer over a model folder's tokenizer.json, for bench/bench_full_floor.py.

Imported only by torchtune's process (its own venv): prompt tokens masked, completion tokens and EOS trained
on, as the llm-trainer tokenizes prompt/completion rows. Each row's (tokens, targets) is appended to
$TT_PEER_COUNTS so the bench can compute torchtune's train time from its per-step tokens/s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer


class PeerTokenizer:
    def __init__(self, path: str, max_seq_len: int):
        self.tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        config = json.loads((Path(path) / "tokenizer_config.json").read_text())
        self.eos_id = self.tokenizer.token_to_id(config["eos_token"])
        self.pad_id = self.tokenizer.token_to_id(config["pad_token"])
        self.max_seq_len = max_seq_len

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [*ids, self.eos_id] if add_eos else ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def tokenize_messages(self, messages, **_) -> tuple[list[int], list[bool]]:
        tokens, mask = [], []
        for m in messages:
            text = "".join(c["content"] for c in m.content if c["type"] == "text")
            ids = self.encode(text, add_eos=m.role == "assistant")
            tokens += ids
            mask += [m.masked] * len(ids)
        tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        if os.environ.get("TT_PEER_COUNTS"):
            with open(os.environ["TT_PEER_COUNTS"], "a") as f:
                f.write(json.dumps([len(tokens), sum(not x for x in mask)]) + "\n")
        return tokens, mask

    def __call__(self, sample: dict, inference: bool = False) -> dict:
        tokens, mask = self.tokenize_messages(sample.pop("messages"))
        return {**sample, "tokens": tokens, "mask": mask}


def tokenizer(path: str, max_seq_len: int) -> PeerTokenizer:
    return PeerTokenizer(path, max_seq_len)
