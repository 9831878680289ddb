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
from ..listing import Listing
from ..progress import log
from ..uri import LocalUri
from .base import RemoteFile, Source


class LocalSource(Source):
    max_concurrency = 8  # disks gain little from more

    def __init__(self, uri: LocalUri, config: Config):
        self.root = Path(uri.path)
        self.uri = uri
        self.tuning = config.tuning
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
        listing = Listing(str(self.uri), self.tuning)
        if self.root.is_file():
            self._add(listing, self.root, self.root.name)
            return listing.files()
        real_root = os.path.realpath(self.root)
        outside: list[str] = []
        # Symlinked files are copied as their content when they stay inside the source; symlinked folders
        # are not followed (loops). A link out of the source (to a mounted secret, say) is skipped.
        for folder, dirs, names in os.walk(self.root, onerror=self._walk_error):
            listing.page()
            dirs.sort()
            for name in sorted(names):
                path = Path(folder, name)
                relative = path.relative_to(self.root).as_posix()
                if path.is_symlink() and not os.path.realpath(path).startswith(real_root + os.sep):
                    outside.append(relative)
                elif path.is_file():
                    self._add(listing, path, relative)
        if outside:
            log(
                f"skipping {len(outside)} symlinks that point outside {self.root} (e.g. {outside[0]!r}): "
                "only files inside the source are copied"
            )
        return listing.files()

    @staticmethod
    def _walk_error(exc: OSError) -> None:
        raise InitializerError(f"cannot read {exc.filename}: {exc.strerror}; check the volume permissions")

    @staticmethod
    def _add(listing: Listing, path: Path, relative: str) -> None:
        st = path.stat()
        listing.add(str(path), st.st_size, f"{st.st_size}-{st.st_mtime_ns}", path=relative)

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
