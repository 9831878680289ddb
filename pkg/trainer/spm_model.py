"""The user-defined pieces of a SentencePiece model file (tokenizer.model), read without sentencepiece.

sentencepiece's encode matches a user-defined piece (Gemma's <start_of_turn>, <end_of_turn>) where it
appears in a text, and never a control piece (<bos>, <eos>, Mistral's [INST]); the model folder's
tokenizer.json marks both kinds special, so only the model file tells them apart. The file is a protobuf
ModelProto: field 1 holds the pieces, each a message with its text (field 1) and type (field 3; 4 is
USER_DEFINED). Reading those two fields by hand keeps protobuf out of the trainer's dependencies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

USER_DEFINED = 4


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: varints as ints, the others as their bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):  # fixed 64 / 32 bits (a piece's score)
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"not a SentencePiece model (protobuf wire type {wire})")
        yield key >> 3, value


def user_defined_pieces(path: Path) -> list[str]:
    """The model's user-defined pieces, in id order."""
    out = []
    for number, piece in _fields(path.read_bytes()):
        if number == 1:
            fields = dict(_fields(piece))
            if fields.get(3) == USER_DEFINED:
                out.append(fields[1].decode())
    return out
