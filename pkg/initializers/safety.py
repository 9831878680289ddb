"""Keep every write inside OUTPUT_PATH: refuse traversal, absolute paths and symlinked parents."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import InitializerError


def safe_relative(path: str, where: str) -> str:
    """Validate a source-relative path and return it normalised, or raise InitializerError."""
    if not path or "\x00" in path:
        raise InitializerError(f"refusing {where} {path!r}: empty or NUL in name")
    if path.startswith("/") or path.startswith("\\") or (len(path) > 1 and path[1] == ":"):
        raise InitializerError(f"refusing {where} {path!r}: absolute paths would escape OUTPUT_PATH")
    parts = path.split("/")  # not PurePosixPath: this runs once per listed file, a million times maybe
    if any(p in ("..", ".") for p in parts) or not any(parts):
        raise InitializerError(f"refusing {where} {path!r}: '..' or '.' would escape OUTPUT_PATH")
    return "/".join(p for p in parts if p) if "" in parts else path


def target_path(root: Path, relative: str, checked: set[Path] | None = None) -> Path:
    """Create the parent folders of `root/relative` and check that none of them leads outside `root`.
    Folders in `checked` were checked before (by this run, which creates no symlinks) and are skipped;
    newly checked ones are added to it."""
    target = root / relative
    parent = target.parent
    if checked is None or parent not in checked:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InitializerError(
                f"cannot write {relative!r}: a file in OUTPUT_PATH has the name of one of its folders "
                "(the source holds both a file and a folder of that name?)"
            ) from None
        real_root = os.path.realpath(root)
        real_parent = os.path.realpath(parent)
        if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
            raise InitializerError(
                f"refusing to write {relative!r}: a symlink in OUTPUT_PATH points outside it"
            )
        if checked is not None:
            checked.add(parent)
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(mode):
        raise InitializerError(
            f"refusing to write {relative!r}: it exists in OUTPUT_PATH as a symlink or folder"
        )
    return target
