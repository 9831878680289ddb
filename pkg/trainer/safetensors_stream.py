"""Safetensors files written and read one tensor at a time, so a whole model never sits in memory.

`safetensors.torch.save_file` takes the whole state dict (and turns each tensor into bytes first); here the
layout (names, dtypes, shapes) is planned up front, the headers are written, and each tensor is written at
its offset as it arrives, in any order. The shards and index follow transformers' `save_pretrained`:
`model.safetensors`, or `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` when the
model is larger than `max_shard_size` (transformers' default, 50 GB, split by huggingface_hub's rule).

Reading uses plain file reads rather than a memory map, so the pages of tensors already read do not stay
counted in the process's resident memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class StreamWriter:
    """Writes `layout` ({name: (dtype, shape)}) into `folder` as shards: `write` each tensor once, `close`.

    `total_parameters` goes into the index's metadata as save_pretrained writes it.
    """

    def __init__(
        self,
        folder: Path,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        total_parameters: int,
        max_shard_size: int | str = MAX_SHARD_SIZE,
    ) -> None:
        from huggingface_hub import split_torch_state_dict_into_shards

        placeholders = {
            n: torch.empty(shape, dtype=dtype, device="meta") for n, (dtype, shape) in layout.items()
        }
        split = split_torch_state_dict_into_shards(
            placeholders, filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=max_shard_size,
        )  # fmt: skip
        self.layout = layout
        self.where: dict[str, tuple[int, int]] = {}  # name -> (file descriptor, absolute offset)
        self.pending = set(layout)
        self.fds: list[int] = []
        for filename, names in split.filename_to_tensors.items():
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                dtype, shape = layout[name]
                end = offset + _nbytes(dtype, shape)
                header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
                offset = end
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            fd = os.open(folder / filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + offset)
            for name in names:
                self.where[name] = (fd, 8 + len(raw) + header[name]["data_offsets"][0])
        if split.is_sharded:
            index = {
                "metadata": {"total_parameters": total_parameters, **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
            (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {tuple(shape)}"
            )
        fd, offset = self.where[name]
        data = _as_bytes(tensor)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        self.pending.discard(name)

    def close(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []
        if self.pending:
            raise RuntimeError(
                f"{len(self.pending)} tensors were never written, e.g. {sorted(self.pending)[:3]}"
            )


class StreamReader:
    """The tensors of a model folder's safetensors files (single file or index), read one at a time."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX_NAME
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [WEIGHTS_NAME] if (folder / WEIGHTS_NAME).exists() else sorted(
                p.name for p in folder.glob("*.safetensors")
            )  # fmt: skip
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for name in files:
            path = folder / name
            with path.open("rb") as f:
                try:
                    (size,) = struct.unpack("<Q", f.read(8))
                    if size > path.stat().st_size - 8:  # not a header length: do not try to read that much
                        raise ValueError("header size")
                    header = json.loads(f.read(size))
                    header.pop("__metadata__", None)
                    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
                except (struct.error, ValueError, TypeError, KeyError, IndexError):
                    raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
            if 8 + size + end > path.stat().st_size:
                raise ValueError(f"{path} is truncated")
            for key, entry in header.items():
                self.entries[key] = (path, 8 + size, entry)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read_dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name][2]["dtype"]]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor `name`, or only its rows `rows` (a slice of the first dimension, step 1)."""
        path, start, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if rows is not None and shape:
            first, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
            begin, end = begin + first * row_bytes, begin + max(stop, first) * row_bytes
            shape[0] = max(stop - first, 0)
        tensor = torch.empty(shape, dtype=_DTYPES[entry["dtype"]])
        view = _as_bytes(tensor) if tensor.numel() else memoryview(b"")
        done = 0
        with path.open("rb", buffering=0) as f:
            f.seek(start + begin)
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    break
                done += got
        if done != end - begin:
            raise ValueError(f"{path}: {name} is truncated")
        return tensor
