"""Reads the records of a W&B offline run file (run-<id>.wandb), for tests: wandb 0.31 ships no reader.

The file is a LevelDB-style log: a 7-byte header (":W&B", a magic, a version), then 32 KiB blocks of chunks,
each with a 7-byte header (CRC, length, type: full, first, middle, last) and a piece of one protobuf
`Record` of wandb's internal protocol.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, out, parts = 7, [], b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            parts = chunk
        else:
            parts += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows: {key: value} with `_step`, in order."""
    import json

    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows


def config(path: Path) -> dict[str, Any]:
    """The run's config: what `wandb.init(config=...)` and later updates set."""
    return _items(path, "config")


def summary(path: Path) -> dict[str, Any]:
    return _items(path, "summary")


def _items(path: Path, what: str) -> dict[str, Any]:
    import json

    values: dict[str, Any] = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == what:
            items = getattr(record, what).update
        elif kind == "run":
            items = getattr(record.run, what).update
        else:
            continue
        for item in items:
            values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values
