"""Free space on the output volume: sizes, a check before writing, and the hint when a write found it full."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


def disk_full(e: BaseException) -> bool:
    """Whether `e` is, or wraps, a full disk or quota."""
    seen: BaseException | None = e
    while seen is not None:
        full = isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def size_of(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def space_problem(folder: Path, needed: int, what: str, note: str = "") -> str | None:
    """One line when the volume of `folder` has less than `needed` bytes free, else None."""
    free = shutil.disk_usage(folder).free
    if free >= needed:
        return None
    return (
        f"{what} needs ~{gib(needed)} but the volume of {folder} has {gib(free)} free{note}: "
        "free space, or give output_dir a larger volume"
    )


def space_hint(e: BaseException) -> str:
    """What to do when `e` is, or wraps, a full disk or quota (appended to a one-line error), else ""."""
    return ": the volume of output_dir is full; free space or give it a larger volume" if disk_full(e) else ""
