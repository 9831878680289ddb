"""Files and folders that appear whole or not at all, and the digest that says whether a folder changed.

Every output a reader may look at while it is being written (metrics.jsonl rewound on resume, summary.json,
loss.png, checkpoint meta, the tokenized cache, the reference log-probs, adapter/ and model/) is written
under a temporary name next to its final place and renamed into it: a crash leaves the old content or a
hidden leftover (`.NAME.tmp-*`, `.trash-*`), never a torn file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse fsync on folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write; on success it is synced and renamed to `path`.

    For writers that take a path: ``with atomic_file(p) as tmp: torch.save(x, tmp)``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in place of `final` in one rename; an older `final` is renamed aside
    first (`.trash-*`, which a crash may leave behind) and deleted once replaced."""
    old = None
    if final.exists():
        old = final.with_name(f".trash-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename.

    `keep_existing`: a `final` that appeared meanwhile (another node wrote the same cache) is kept and
    the temporary folder dropped, instead of replacing it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if keep_existing:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
        else:
            replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """Delete a folder so that it never looks complete half-way: rename it aside (`.trash-*`) first."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def dir_digest(
    path: str | os.PathLike, small_file_bytes: int = 1 << 20, skip_suffixes: tuple[str, ...] = ()
) -> str:
    """A short digest of a model or dataset folder: names and sizes of every file, content of small ones.

    The one rule for "did this folder change" (the run fingerprint of checkpoints, the tokenized cache,
    the reference log-probs). By content, not modification times: the same files copied to another volume
    or fetched again by an initializer digest the same, so a resume is not refused and a cache is not
    rebuilt for nothing. Cheap on multi-GB folders (files over `small_file_bytes` count by name and size,
    so an edit that keeps such a file's size is not seen). Paths are relative (the same data mounted
    elsewhere digests the same); huggingface_hub's `.cache/` metadata and files ending in `skip_suffixes`
    are left out.
    """
    root = Path(path)
    h = hashlib.sha256()
    if not root.exists():
        return "missing"
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.name if p == root else p.relative_to(root).as_posix()
        if rel.startswith(".cache/") or "/.cache/" in rel or (skip_suffixes and rel.endswith(skip_suffixes)):
            continue
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= small_file_bytes:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]
