"""Local files read by offset, a block at a time, and their MD5s: the one reader behind every checksum the
initializers (a finished download) and the exporter (what it uploads or copies) compute."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import InitializerError

BLOCK = 1024 * 1024  # per thread reading: 16 workers hold 16 MiB


def blocks(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """Bytes [start, start + length) of `path` (to its end when None), BLOCK at a time, by offset (no shared
    file position: threads may read one file at once). A file that ends before them is refused."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = start
        end = os.fstat(fd).st_size if length is None else start + length
        while offset < end:
            block = os.pread(fd, min(BLOCK, end - offset), offset)
            if not block:
                raise InitializerError(
                    f"{path} shrank while it was being exported; rerun once it is complete"
                )
            yield block
            offset += len(block)
    finally:
        os.close(fd)


def md5_of(path: Path, start: int = 0, length: int | None = None) -> hashlib._Hash:
    """MD5 of `length` bytes of `path` from `start` (to the end when None)."""
    digest = hashlib.md5(usedforsecurity=False)
    for block in blocks(path, start, length):
        digest.update(block)
    return digest
