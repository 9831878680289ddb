"""Local source: a mounted volume or PVC (`file:///PATH` or `/PATH`), copied through the shared engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
        try:
            yield _iter_file(file.key, start, end)
        except FileNotFoundError:
            raise InitializerError(f"{file.key} disappeared during the copy; rerun") from None


def _iter_file(path: str, start: int, end: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as src:
        src.seek(start)
        left = end - start
        while left > 0:
            block = src.read(min(chunk, left))
            if not block:
                return
            left -= len(block)
            yield block
