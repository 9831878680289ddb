"""The one place every source's listing entries go through: validated, de-duplicated and bounded.

A listing comes from a server (or a volume) that may be broken or hostile, so nothing in it is trusted:
a path that is not a string, a size that is not a non-negative integer, a name the filesystem cannot hold,
an entry repeated by a server that pages in circles, or more entries and time than INIT_MAX_FILES and
INIT_LIST_TIMEOUT allow each end the run with one line that names the server's fault. Entries under the
source's own `.initializer/` folder (a copy of a folder an initializer filled) are skipped with a line:
copying them would forge this run's completion marker, journal or lock.
"""

from __future__ import annotations

import time

from .config import Tuning
from .errors import InitializerError
from .manifest import STATE_DIR
from .progress import log
from .safety import safe_relative
from .sources.base import RemoteFile

MAX_NAME_BYTES = 255  # NAME_MAX of every Linux filesystem a volume is likely to use
MAX_PATH_BYTES = 4000  # PATH_MAX is 4096, OUTPUT_PATH included
MAX_PAGES = 1_000_000  # pages without entries count here, so an empty page repeated forever ends too


class Listing:
    """Collect one source's entries: `page()` once per page or request, `add(...)` per entry, `files()`."""

    def __init__(self, where: str, tuning: Tuning, prefix: str = ""):
        self.where = where  # who answered, as the user knows it: "the Hub at https://...", "S3 bucket ..."
        self.prefix = prefix  # what every key must start with: the folder that was asked for
        self._max_files = tuning.max_files
        self._timeout = tuning.list_timeout
        self._deadline = time.monotonic() + tuning.list_timeout
        self._files: list[RemoteFile] = []
        self._seen: dict[str, str] = {}  # path -> key
        self._pages = 0
        self._state: list[str] = []  # the first entry under STATE_DIR, then only counted
        self._state_count = 0

    def malformed(self, detail: str) -> InitializerError:
        """The error for an answer that breaks the protocol: the server's fault, not the user's."""
        return InitializerError(
            f"{self.where} sent a malformed listing ({detail}): the server or a proxy in front of it is "
            "broken; check the endpoint"
        )

    def left(self) -> float:
        """Seconds left before INIT_LIST_TIMEOUT; raises once it has passed."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise InitializerError(
                f"listing {self.where} took longer than INIT_LIST_TIMEOUT={self._timeout:g}s "
                f"({len(self._files)} files, {self._pages} pages so far): a server paging without end, "
                "or a larger source than meant; raise INIT_LIST_TIMEOUT if it is legitimate"
            )
        return left

    def page(self) -> None:
        """Count one page (or listing request) against the page cap and the deadline."""
        self._pages += 1
        if self._pages > MAX_PAGES:
            raise self.malformed(f"more than {MAX_PAGES} pages")
        self.left()

    def add(
        self,
        key: object,
        size: object,
        version: str,
        *,
        path: object = None,
        md5: str | None = None,
        md5_of_parts: str | None = None,
        sha256: str | None = None,
        git_sha1: str | None = None,
    ) -> None:
        """Validate one entry as the server sent it: `key` is where the source finds it, `path` where it
        lands (default: the key without the prefix, which it must start with)."""
        if not isinstance(key, str) or not isinstance(path, (str, type(None))):
            raise self.malformed(f"a name that is not a string: {str(key if path is None else path)[:80]!r}")
        if not key.startswith(self.prefix):
            raise self.malformed(f"{key[:200]!r} lies outside the folder asked for, {self.prefix!r}")
        if path is None:
            path = key[len(self.prefix) :]
        if type(size) is not int:  # bool is an int subclass, and neither "12" nor 1.5 is a size
            raise self.malformed(f"the size of {key[:200]!r} is not an integer: {str(size)[:40]!r}")
        if size < 0:
            raise self.malformed(f"a negative size for {key[:200]!r}: {size}")
        path = safe_relative(path, "path")
        encoded = path.encode("utf-8", "surrogateescape")
        if len(encoded) > MAX_PATH_BYTES or any(len(p) > MAX_NAME_BYTES for p in encoded.split(b"/")):
            raise InitializerError(
                f"refusing path {path[:200]!r}: a name longer than {MAX_NAME_BYTES} bytes (or a path "
                f"longer than {MAX_PATH_BYTES}) cannot be written on the output filesystem"
            )
        if path.split("/", 1)[0] == STATE_DIR:
            self._state_count += 1
            if not self._state:
                self._state.append(path)
            return
        first = self._seen.get(path)
        if first is not None:
            if first != key:
                raise InitializerError(f"refusing {key!r}: it lands on the same path as {first!r}")
            raise InitializerError(
                f"{self.where} listed {key!r} twice: a server repeating its pages; check the endpoint"
            )
        self._seen[path] = key
        self._files.append(
            RemoteFile(path, size, key, version, md5, md5_of_parts, sha256=sha256, git_sha1=git_sha1)
        )
        if len(self._files) > self._max_files:
            raise InitializerError(
                f"{self.where} listed more than INIT_MAX_FILES={self._max_files} files: a server paging "
                "without end, or a larger source than meant; narrow STORAGE_URI, or raise INIT_MAX_FILES "
                "if it is legitimate"
            )

    def files(self) -> list[RemoteFile]:
        """The entries, after saying which were skipped as the source's own state folder."""
        if self._state:
            log(
                f"skipping {self._state_count} files under {STATE_DIR}/ in the source "
                f"(e.g. {self._state[0]!r}): "
                "that name is the initializer's own state folder (marker, journal, lock) and is never copied"
            )
        return self._files
