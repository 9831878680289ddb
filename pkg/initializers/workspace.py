"""OUTPUT_PATH before anything is listed: writable by this process, and holding this source's files or none.

A workspace volume is often shared by successive jobs (the runtimes' default claim is one per namespace):
a second source downloaded on top of a first would leave the first's files beside its own, and the trainer
would read both. So a folder that holds another source's download, or files no initializer put there, is
refused in one line naming both, unless OVERWRITE=true, which empties it first (never following a symlink
or crossing into another mount: nothing outside OUTPUT_PATH is touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import InitializerError, volume_error
from .manifest import JOURNAL, MANIFEST, read_json, state_dir
from .progress import log
from .uri import parse_uri

# What a fresh volume may hold that no one put there: ext2/3/4 make lost+found at a filesystem's root.
VOLUME_LEFTOVERS = frozenset({"lost+found"})
# The request fields that name a source; the patterns only choose among its files.
SOURCE_FIELDS = ("kind", "storage_uri", "endpoint", "hf_endpoint")


def check_writable(root: Path) -> None:
    """Create OUTPUT_PATH and its state folder, and write a file there, or say whose permission is missing."""
    probe = state_dir(root) / f"probe-{os.getpid()}"
    try:
        state_dir(root).mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise volume_error(f"OUTPUT_PATH={root}", exc) from None


def source_of(request: dict[str, Any]) -> dict[str, Any]:
    """The fields of a marker or journal request that name its source, its URI in today's spelling."""
    source = {k: request.get(k) for k in SOURCE_FIELDS}
    with contextlib.suppress(InitializerError):  # not a URI this version reads: another source for sure
        source["storage_uri"] = str(parse_uri(str(source["storage_uri"])))
    return source


def check_contents(root: Path, request: dict[str, Any], overwrite: bool) -> None:
    """Refuse (or with `overwrite` empty) an OUTPUT_PATH holding another source's download or stray files.
    The same source's marker or journal is fine: the run reuses what they vouch for."""
    mine = source_of(request)
    found = None
    marker = read_json(state_dir(root) / MANIFEST)
    journal = _journal_request(root)
    if marker and isinstance(marker.get("request"), dict):
        if source_of(marker["request"]) != mine:
            found = f"a completed download of {_describe(marker['request'])}"
    elif journal is not None:
        if source_of(journal) != mine:
            found = f"an unfinished download of {_describe(journal)}"
    else:
        strays = sorted(e.name for e in os.scandir(root) if e.name not in VOLUME_LEFTOVERS | {".initializer"})
        if strays:
            shown = ", ".join(_kind(root / name) for name in strays[:3])
            more = f" and {len(strays) - 3} more" if len(strays) > 3 else ""
            found = f"files no initializer put there ({shown}{more})"
    if found is None:
        return
    if not overwrite:
        raise InitializerError(
            f"OUTPUT_PATH={root} holds {found}; this run is for {_describe(request)}: use another "
            "OUTPUT_PATH (a folder or claim per source), or set OVERWRITE=true to empty it first"
        )
    clear(root)
    log(f"OVERWRITE=true: emptied {root}, which held {found}")


def clear(root: Path) -> None:
    """Remove everything in `root` but this run's lock, never following a symlink or entering a mount."""
    if Path(__file__).resolve().is_relative_to(root.resolve()) or root.resolve() == Path("/"):
        raise InitializerError(f"refusing OVERWRITE=true on OUTPUT_PATH={root}: it holds the system itself")
    device = os.lstat(root).st_dev
    for entry in os.scandir(root):
        if entry.name == ".initializer":
            for inner in os.scandir(entry.path):
                if inner.name != "lock":
                    _remove(Path(inner.path), device)
        else:
            _remove(Path(entry.path), device)


def _remove(path: Path, device: int) -> None:
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        if info.st_dev != device:
            raise InitializerError(
                f"refusing to empty {path}: another volume is mounted there; unmount it or use another "
                "OUTPUT_PATH"
            )
        for entry in os.scandir(path):
            _remove(Path(entry.path), device)
        path.rmdir()
    else:
        path.unlink()  # a file, or a symlink itself (never what it points to)


def _journal_request(root: Path) -> dict[str, Any] | None:
    """The request a journal (an unfinished run's record) was started for: its first line."""
    try:
        with open(state_dir(root) / JOURNAL, encoding="utf-8") as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    request = header.get("request") if isinstance(header, dict) else None
    return request if isinstance(request, dict) else None


def _describe(request: dict[str, Any]) -> str:
    where = request.get("endpoint") or (
        request.get("hf_endpoint") if request.get("hf_endpoint") != "https://huggingface.co" else None
    )
    return f"{request.get('kind')} {request.get('storage_uri')}" + (f" at {where}" if where else "")


def _kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return f"{path.name!r} (a symlink)"
    return repr(path.name + ("/" if stat.S_ISDIR(mode) else ""))
