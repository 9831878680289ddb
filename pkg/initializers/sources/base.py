"""The one interface every source implements: list files, then read byte ranges of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)  # slots: a million entries of a listing stay a few hundred MB
class RemoteFile:
    """One file to fetch. `path` is relative to OUTPUT_PATH (POSIX separators, validated by `Listing`)."""

    path: str
    size: int
    key: str  # where the source finds it: S3 key, repo path or absolute local path
    version: str  # changes whenever the content does (ETag, blob id, size+mtime); recorded in the manifest
    md5: str | None = None  # S3 single-part ETag
    md5_of_parts: str | None = None  # S3 multipart ETag "<md5 of the parts' md5s>-<number of parts>"
    sha256: str | None = None  # Hub LFS files
    git_sha1: str | None = None  # Hub regular files: sha1 of "blob <size>\0" + content


class Source(ABC):
    """A place files come from. Implementations raise TransientError for failures worth retrying and
    InitializerError for ones that are not (auth, not found)."""

    #: largest number of concurrent connections that makes sense (local copies need fewer).
    max_concurrency: int = 64

    @abstractmethod
    def list_files(self) -> list[RemoteFile]:
        """Every file under the source root, before pattern filtering."""

    @abstractmethod
    def open_range(self, file: RemoteFile, start: int, end: int) -> AbstractContextManager[Iterator[bytes]]:
        """Stream bytes [start, end) of `file` as chunks; a short stream is detected by the caller."""

    def part_sizes(self, file: RemoteFile, exact: bool = False) -> list[int] | None:
        """Sizes of the parts `file` was uploaded in, to check its `md5_of_parts`: a guess from the first
        part (uploaders use one size but for the last), or with `exact` each part's own; None: unknown."""
        return None

    def verifiable(self, file: RemoteFile) -> bool:
        """False once reading `file` showed that its listed checksum is not a digest of its bytes (then its
        size, and part structure, are what is verified)."""
        return True

    def host(self, file: RemoteFile) -> str:
        """The server `file`'s bytes are asked from (the engine remembers which ones ignore Range); '' for
        sources that are not HTTP."""
        return ""

    def resolved(self) -> dict[str, str]:
        """Facts learned while listing (e.g. the commit a branch pointed to), recorded in the manifest."""
        return {}

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Make reads in progress in other threads return now (the run is stopping)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
