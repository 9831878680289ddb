"""How a checkpoint's tensors lie in its files: torch.distributed.checkpoint (DCP) storage that writes each
tensor's bytes as they are in memory, and hashes them as it writes.

DCP's own FileSystemWriter wraps every tensor in a ``torch.save`` archive of its own (a zip with a pickle and
a CRC32 of the bytes) and its reader ``torch.load``s each back: a LoRA checkpoint holds ~500 small tensors
(adapter, two AdamW moments and a step count per weight), and those per-tensor archives were a third of the
save's CPU time and half the load's (docs/benchmarks.md). Here a tensor is its bytes, row-major, at the offset
DCP's metadata records; its dtype and shape are in that metadata already (DCP plans, reshards and names the
files exactly as before: only the bytes of each tensor entry differ). Each such entry carries the descriptor
:data:`RAW`, so the stock FileSystemReader refuses it (an unknown extension) instead of misreading it, and
:class:`Reader` still loads the ``torch.save`` entries of checkpoints saved before.

The writer feeds every byte it writes to the checkpoint's digest (checksums.py) on the way, so the save does
not read its shards back to hash them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from pkg.trainer import checksums

RAW = "llm-trainer-raw/1"  # a tensor entry's bytes are the tensor's own, row-major
_BUFFER = 1 << 20  # small tensors coalesce into few writes; large ones go straight from their memory


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, 0-d included)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


class Writer(FileSystemWriter):
    """One file per rank (``__<rank>_0.distcp``), as DCP names them; synced before DCP writes its metadata.

    ``digests`` holds {file name: digest} of the files this rank wrote, once :meth:`write_data` is done.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=True)
        self.digests: dict[str, str] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0.distcp"
        digest = checksums.HASHERS[checksums.ALGORITHM]()
        results, offset = [], 0
        with open(Path(self.path) / name, "wb", buffering=_BUFFER) as f:
            for item in plan.items:
                data = planner.resolve_data(item)
                descriptors = None
                if item.type == WriteItemType.BYTE_IO:  # non-tensor values, already pickled by the planner
                    view = data.getbuffer()
                else:  # DCP copies a device tensor to the CPU here too
                    view = _bytes(data.detach().cpu().contiguous())
                    descriptors = [RAW]
                f.write(view)
                digest.update(view)
                info = _StorageInfo(name, offset, view.nbytes, transform_descriptors=descriptors)
                results.append(WriteResult(index=item.index, size_in_bytes=view.nbytes, storage_data=info))
                offset += view.nbytes
            f.flush()
            os.fsync(f.fileno())  # the shard is on disk before the metadata that names it
        self.digests[name] = f"{checksums.ALGORITHM}:{digest.hexdigest()}"
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


class Reader(FileSystemReader):
    """Reads :class:`Writer`'s raw tensor entries, and the ``torch.save`` entries of older checkpoints."""

    def set_up_storage_reader(self, metadata: Metadata, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, *args, **kwargs)
        self.tensors: Mapping[str, Any] = metadata.state_dict_metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        raw, older = [], []
        for req in plan.items:
            is_raw = RAW in (self.storage_data[req.storage_index].transform_descriptors or ())
            (raw if is_raw else older).append(req)
        if older:  # bytes entries, and every tensor of a checkpoint saved before
            super().read_data(LoadPlan(older), planner)
        by_file: dict[str, list] = {}
        for req in raw:
            by_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for name, reqs in by_file.items():
            with open(Path(self.path) / name, "rb", buffering=0) as f:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    self._read_tensor(f, req, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_tensor(self, f: io.RawIOBase, req: Any, planner: LoadPlanner) -> None:
        info = self.storage_data[req.storage_index]
        meta = self.tensors[req.storage_index.fqn]
        assert isinstance(meta, TensorStorageMetadata)
        chunk = next(c for c in meta.chunks if c.offsets == req.storage_index.offset)
        target = planner.resolve_tensor(req).detach()
        direct = (
            list(req.lengths) == list(chunk.sizes) == list(target.size())
            and target.is_cpu
            and target.is_contiguous()
            and target.dtype == meta.properties.dtype
        )
        # The whole saved chunk into this rank's tensor: read into its memory, no copy in between.
        tensor = target if direct else torch.empty(chunk.sizes, dtype=meta.properties.dtype)
        view = _bytes(tensor)
        if view.nbytes != info.length:
            raise ValueError(f"{info.relative_path}: {req.storage_index.fqn} has {info.length} bytes, "
                             f"its metadata says {view.nbytes}")  # fmt: skip
        f.seek(info.offset)
        done = 0
        while done < info.length:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{info.relative_path} ends inside {req.storage_index.fqn}")
            done += n
        if not direct:
            part = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
            if target.size() != part.size():
                raise ValueError(f"{req.storage_index.fqn}: saved {tuple(part.size())}, "
                                 f"this model has {tuple(target.size())}")  # fmt: skip
            target.copy_(part)
        planner.commit_tensor(req, target)
