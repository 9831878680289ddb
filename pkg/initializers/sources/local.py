"""Local source: a mounted volume or PVC (`file:///PATH` or `/PATH`), copied through the shared engine."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..config import Config
from ..errors import InitializerError
from ..uri import LocalUri
from .base import RemoteFile, Source


class LocalSource(Source):
    max_concurrency = 8  # disks gain little from more

    def __init__(self, uri: LocalUri, config: Config):
        self.root = Path(uri.path)
        self.uri = uri
        out = os.path.realpath(config.output_path)
        if os.path.realpath(self.root) in (out,) or out.startswith(os.path.realpath(self.root) + os.sep):
            raise InitializerError(
                f"STORAGE_URI {uri} contains OUTPUT_PATH={config.output_path}; pick another"
            )

    def list_files(self) -> list[RemoteFile]:
        if not self.root.exists():
            raise InitializerError(
                f"{self.root} does not exist: check STORAGE_URI and that the volume is mounted"
            )
        if self.root.is_file():
            return [self._file(self.root, self.root.name)]
        files: list[RemoteFile] = []
        # Symlinked files are copied as their content; symlinked folders are not followed (loops).
        for folder, dirs, names in os.walk(self.root, onerror=self._walk_error):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder, name)
                if path.is_file():
                    files.append(self._file(path, path.relative_to(self.root).as_posix()))
        return files

    @staticmethod
    def _walk_error(exc: OSError) -> None:
        raise InitializerError(f"cannot read {exc.filename}: {exc.strerror}; check the volume permissions")

    @staticmethod
    def _file(path: Path, relative: str) -> RemoteFile:
        st = path.stat()
        return RemoteFile(relative, st.st_size, str(path), f"{st.st_size}-{st.st_mtime_ns}")

    @contextmanager
    def open_range(self, file: RemoteFile, start: int, end: int) -> Iterator[Iterator[bytes]]:
        with _open_regular(file.key) as src:
            yield _iter_file(src, file.key, start, end)


@contextmanager
def _open_regular(path: str) -> Iterator[BinaryIO]:
    """Open a listed file for reading. O_NONBLOCK: a FIFO swapped in since the listing must not block
    open() until a writer comes; anything but a regular file is refused. A read error is the source's,
    never reported as one writing OUTPUT_PATH."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InitializerError(f"{path} disappeared during the copy; rerun") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InitializerError(
                f"{path} is no longer a regular file (a FIFO, device or socket took its place); rerun"
            )
        os.set_blocking(fd, True)
        src = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with src:
        yield src


def _unreadable(path: str, exc: OSError) -> InitializerError:
    return InitializerError(
        f"cannot read {path} from STORAGE_URI: {exc.strerror or exc}; check the source volume's permissions"
    )


def _iter_file(src: BinaryIO, path: str, start: int, end: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    try:
        src.seek(start)
        left = end - start
        while left > 0:
            block = src.read(min(chunk, left))
            if not block:
                return
            left -= len(block)
            yield block
    except OSError as exc:
        raise _unreadable(path, exc) from None
