"""The completion marker and the resume journal, both under `OUTPUT_PATH/.initializer/`.

- `manifest.json` is written last, atomically, once every file is on disk and verified. A rerun that finds
  one for the same request (same source and filters) and sees every listed file with its size exits at once.
- `journal.jsonl` records each verified file (and each finished part of a large file) as it completes, so
  a rerun after kill -9 fetches only what is missing or partial. It is removed when the marker is written.
- `partial/` holds the temporary files of large downloads; they are renamed into place when verified.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

from .errors import InitializerError, volume_error
from .sources.base import RemoteFile

STATE_DIR = ".initializer"
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
FORMAT = 1


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def check_state_dir(root: Path) -> None:
    """Refuse a state folder (or a lock, journal, marker or partial/ in it) that is not what this code makes:
    through a symlink left on a shared volume, the lock, journal and marker would land outside OUTPUT_PATH
    and `partial/` would be emptied wherever it points."""
    folder = state_dir(root)
    for path in (folder, folder / "lock", folder / JOURNAL, folder / MANIFEST, folder / "partial"):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise volume_error(path, exc, "read") from None
        want_dir = path in (folder, folder / "partial")
        if stat.S_ISLNK(mode) or stat.S_ISDIR(mode) != want_dir:
            what = "a symlink" if stat.S_ISLNK(mode) else ("not a folder" if want_dir else "not a file")
            raise InitializerError(
                f"refusing to use {path}: it is {what}, and the initializer keeps its lock, journal and "
                f"completion marker in {STATE_DIR}/; remove it and rerun"
            )


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def complete_manifest(root: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The marker if it describes `request` and every file it lists is present with its size."""
    data = read_json(state_dir(root) / MANIFEST)
    if not data or data.get("format") != FORMAT or data.get("request") != request:
        return None
    for entry in data.get("files", []):
        try:
            if (root / entry["path"]).stat().st_size != entry["size"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return data


def remove_manifest(root: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Called before any write, so a half-updated folder never looks complete. Returns the files of the
    removed marker when it was for the same request: they are known good unless changed since."""
    path = state_dir(root) / MANIFEST
    data = read_json(path)
    path.unlink(missing_ok=True)
    if data and data.get("format") == FORMAT and data.get("request") == request:
        return [e for e in data.get("files", []) if isinstance(e, dict) and "path" in e and "version" in e]
    return []


def write_manifest(
    root: Path, request: dict[str, Any], resolved: dict[str, str], files: list[RemoteFile]
) -> Path:
    """Flush data to disk, then write the marker atomically (temp + fsync + rename)."""
    _syncfs(root)
    entries = []
    for f in files:
        entry: dict[str, Any] = {"path": f.path, "size": f.size, "version": f.version}
        for name in ("md5", "md5_of_parts", "sha256", "git_sha1"):
            if getattr(f, name):
                entry[name] = getattr(f, name)
        entries.append(entry)
    data = {
        "format": FORMAT,
        "request": request,
        "resolved": resolved,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_files": len(files),
        "total_bytes": sum(f.size for f in files),
        "files": entries,
    }
    path = state_dir(root) / MANIFEST
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        json.dump(data, out, indent=1, ensure_ascii=False)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    (state_dir(root) / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(state_dir(root) / "partial", ignore_errors=True)  # leftovers of files no longer wanted
    return path


_LIBC = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE = getattr(_LIBC, "sync_file_range", None)  # Linux
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Have the kernel start writing these bytes (length 0: to the end) to disk now, without waiting, so
    the flush before the marker has little left to wait for and dirty pages do not pile up in the pod's
    memory. A no-op where the call does not exist."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _syncfs(root: Path) -> None:
    """Flush the output filesystem once (cheaper than an fsync per file) before declaring completion."""
    fd = os.open(root, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)


class Journal:
    """Append-only record of finished files and parts, keyed by path and version."""

    def __init__(self, root: Path, request: dict[str, Any], previous: list[dict[str, Any]] | None = None):
        """Continue the journal of the same request, or start one seeded with `previous` marker entries."""
        self.path = state_dir(root) / JOURNAL
        self.files: dict[str, str] = {}  # path -> version
        self.parts: dict[tuple[str, str, int], set[int]] = {}  # (path, version, part size) -> indices
        self._lock = threading.Lock()
        header = {"request": request}
        lines = self._load()
        if lines and lines[0] == header:
            for rec in lines[1:]:
                if "part" in rec:
                    key = (rec["path"], rec["version"], rec.get("part_size", 0))
                    self.parts.setdefault(key, set()).add(rec["part"])
                else:
                    self.files[rec["path"]] = rec["version"]
            self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        else:
            self._out = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
            self._append(header)
            for entry in previous or []:
                self.files[entry["path"]] = entry["version"]
                self._append({"path": entry["path"], "version": entry["version"]})

    def _load(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a torn last line after a crash
        return out

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._out.flush()

    def file_done(self, f: RemoteFile) -> None:
        self._append({"path": f.path, "version": f.version})

    def part_done(self, f: RemoteFile, index: int, part_size: int) -> None:
        self._append({"path": f.path, "version": f.version, "part": index, "part_size": part_size})

    def has_file(self, f: RemoteFile) -> bool:
        return self.files.get(f.path) == f.version

    def done_parts(self, f: RemoteFile, part_size: int) -> set[int]:
        return self.parts.get((f.path, f.version, part_size), set())

    def close(self) -> None:
        self._out.close()
