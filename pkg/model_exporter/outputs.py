"""What to export from the trainer's output folder, and what the run says about itself.

The trainer writes adapter/ (LoRA), model/ (merged or fully fine-tuned), metrics.jsonl, config.yaml, loss.png,
checkpoints/ and, last of all, summary.json: a folder without summary.json is a run that has not finished,
and is refused. `adapter` and `model` export that folder's files at the destination's root (so the
destination loads as it is with peft or transformers); `all` exports every output but checkpoints/, under
their own names. A folder that holds a model itself (config.json or adapter_config.json at its top, no
summary.json) is exported whole: an exporter pointed at a plain model folder works too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkg.initializers.errors import InitializerError
from pkg.initializers.safety import safe_relative

from .config import Export

SKIPPED_IN_ALL = ("checkpoints",)  # training state: large, and useless away from this run


@dataclass(frozen=True)
class LocalFile:
    path: str  # relative, POSIX: the name at the destination
    source: Path
    size: int


@dataclass(frozen=True)
class Selection:
    what: str  # "adapter", "model", "all" or "folder"
    root: Path
    files: tuple[LocalFile, ...]
    summary: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def select(source: Path, export: Export | None) -> Selection:
    """The files to export, refusing a missing or unfinished run in one line that says what to do."""
    if not source.is_dir():
        raise InitializerError(
            f"SOURCE_PATH={source} is not a folder: mount the TrainJob's volume there (or set SOURCE_PATH)"
        )
    summary = read_summary(source)
    if summary is None:
        if (source / "config.json").is_file() or (source / "adapter_config.json").is_file():
            return Selection("folder", source, _walk(source, source), {})
        raise InitializerError(
            f"{source}/summary.json is missing: the training run has not finished (the trainer writes it "
            "last); wait for it, or point SOURCE_PATH at the run's output folder"
        )
    if export is None:
        export = "model" if (source / "model").is_dir() else "adapter"
    if export == "all":
        return Selection("all", source, _walk(source, source, skip=SKIPPED_IN_ALL), summary)
    folder = source / export
    if not folder.is_dir():
        produced = " and ".join(f"{p}/" for p in ("adapter", "model") if (source / p).is_dir())
        raise InitializerError(
            f"EXPORT={export}: the run wrote no {export}/ in {source} (it has "
            f"{produced or 'neither adapter/ nor model/'}; LoRA writes adapter/, with merge_adapter also "
            "model/; full fine-tuning writes model/)"
        )
    return Selection(export, folder, _walk(folder, folder), summary)


def read_summary(source: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((source / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InitializerError(f"{source}/summary.json cannot be read ({exc}); check the volume") from None
    return data if isinstance(data, dict) else {}


def _walk(root: Path, top: Path, skip: tuple[str, ...] = ()) -> tuple[LocalFile, ...]:
    """Regular files under `top` (hidden names and symlinks left out: locks, temporary files, state)."""
    files = []
    for folder, dirs, names in os.walk(top):
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and str(rel_folder / d) not in skip)
        for name in sorted(names):
            path = Path(folder, name)
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            relative = safe_relative(path.relative_to(root).as_posix(), "file")
            files.append(LocalFile(relative, path, path.stat().st_size))
    if not files:
        raise InitializerError(f"{top} holds no files to export")
    return tuple(files)
