"""Where checkpoints live under ``output_dir/checkpoints/`` and which one a run resumes from.

Listing the complete ones, checking their files against what their save wrote, moving a damaged one aside
(``corrupt-step-N``), the ``resume`` setting, a run that already finished, the leftovers of interrupted saves,
and whether every rank sees the same output_dir. The collective ones say so: all ranks, same order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pkg.trainer import distributed
from pkg.trainer.errors import CheckpointError
from pkg.trainer.files import remove_tree

log = logging.getLogger("pkg.trainer")

CHECKPOINTS = "checkpoints"
META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The meta of a complete checkpoint folder, or None when it is incomplete or unreadable."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first. Temporary and broken folders are skipped."""
    root = checkpoints_dir(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (meta := read_meta(p)) and meta.get("step") == int(m.group(1)):
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def file_sizes(folder: Path) -> dict[str, int]:
    """{relative path: bytes} of the files a checkpoint wrote (all but meta.json)."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META
    }


def damage(path: Path) -> str | None:
    """How a complete checkpoint's files differ from what its save wrote (a file gone, truncated or
    grown), or None; checkpoints from before the sizes were recorded are taken as they are."""
    written = (read_meta(path) or {}).get("files")
    if not isinstance(written, dict):
        return None
    found = file_sizes(path)
    for name, size in written.items():
        if name not in found:
            return f"{path / name} is missing"
        if found[name] != size:
            return f"{path / name} has {found[name]} bytes where {size} were written"
    return None


def move_aside(path: Path, why: str) -> None:
    """Rename a damaged checkpoint ``corrupt-step-N`` (kept for inspection, never loaded or pruned), so
    that every retry does not trip over it again, and say so in one line (rank 0)."""
    aside = path.with_name(f"corrupt-{path.name}")
    with contextlib.suppress(OSError):
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(path, aside)
    log.warning(
        "checkpoint %s is damaged (%s): moved aside to %s (delete it when done); "
        "falling back to the previous complete checkpoint", path, why, aside,
    )  # fmt: skip


def newest_intact(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose files are whole; damaged newer ones are moved aside (rank 0)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        why = damage(path)
        if why is None:
            return path
        move_aside(path, why)
    return None


def resume_mode(resume: str | bool | None) -> str:
    """``auto``, ``never`` or ``path``: what the ``resume`` setting means (yes/no spellings too)."""
    value = str(resume).strip().lower() if resume is not None else "never"
    if value in ("auto", "true", "yes", "on", "1"):
        return "auto"
    if value in ("never", "false", "no", "off", "0", "none", ""):
        return "never"
    return "path"


def resolve_resume(output_dir: str | os.PathLike, resume: str | bool | None) -> Path | None:
    """Map the ``resume`` setting to a checkpoint folder (or None to start fresh).

    ``auto``/``true``: the newest complete checkpoint if any. ``never``/``false``/``none``: none.
    Anything else is a path: an ``output_dir``-style folder (its newest checkpoint) or a ``step-N``
    folder, which must be complete.
    """
    mode = resume_mode(resume)
    if mode == "auto":
        return newest_intact(output_dir)
    if mode == "never":
        return None
    value = str(resume).strip()
    path = Path(value)
    if read_meta(path):
        if why := damage(path):
            raise CheckpointError(
                f"resume: checkpoint {path} is damaged ({why}): name an older checkpoint, or use resume: auto"
            )
        return path
    output_dir = path.parent if path.name == CHECKPOINTS else path
    if newest := newest_intact(output_dir):
        return newest
    raise CheckpointError(
        f"resume: {value} is not a complete checkpoint (a checkpoints/step-N folder with {META}) "
        "nor an output_dir that holds one; use resume: auto, resume: never or a valid path"
    )


def find_resume(output_dir: str | os.PathLike, resume: str | bool | None) -> Path | None:
    """Collective :func:`resolve_resume`: rank 0 decides (after cleaning up interrupted saves), all follow.

    With ``resume: never`` the checkpoints of an earlier run in ``output_dir`` are deleted, so they can
    neither be pruned in place of this run's nor resumed by mistake later.
    """
    cleanup_incomplete(output_dir)
    decision: tuple[str | None, str | None] = (None, None)
    if distributed.rank() == 0:
        try:
            path = resolve_resume(output_dir, resume)
            decision = (str(path) if path else None, None)
            if path is None and list_checkpoints(output_dir):
                log.info("resume: %s: deleting the checkpoints of the previous run in %s", resume, output_dir)
                remove_tree(checkpoints_dir(output_dir))
        except CheckpointError as e:
            decision = (None, str(e))
    path, error = distributed.broadcast_object(decision)
    if error:
        raise CheckpointError(error)
    return Path(path) if path else None


def finished_run(
    output_dir: str | os.PathLike,
    fingerprint: Mapping[str, Any],
    length: Mapping[str, Any],
    outputs: Sequence[Path] = (),
) -> dict[str, Any] | None:
    """The ``summary.json`` of a run that already finished with this fingerprint and length, else None.

    ``summary.json`` is written last, after the final outputs, so it marks a completed run; ``length``
    (``max_steps``, ``num_epochs``) must match, so a larger ``max_steps`` extends the run instead, and
    every path in ``outputs`` must exist (a rerun asking for another output, say a merged model, is
    not finished: it resumes from the final checkpoint and writes it). Collective: rank 0 decides.
    """
    summary = None
    if distributed.rank() == 0:
        try:
            found = json.loads((Path(output_dir) / "summary.json").read_text())
        except (OSError, ValueError):
            found = None
        if (
            isinstance(found, dict)
            and found.get("fingerprint") == dict(fingerprint)
            and all(found.get(k) == v for k, v in length.items())
            and all(Path(p).exists() for p in outputs)
        ):
            summary = found
    return distributed.broadcast_object(summary)


def cleanup_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted saves and prunes left behind (rank 0; call before training starts).

    Must not run while another save to the same folder is in progress.
    """
    removed = []
    root = checkpoints_dir(output_dir)
    if distributed.rank() == 0 and root.is_dir():
        for p in root.iterdir():
            incomplete_step = STEP_DIR.match(p.name) and read_meta(p) is None
            if p.name.startswith((".tmp-", ".trash-")) or incomplete_step:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    distributed.barrier()
    return removed


def shared_by_all_ranks(output_dir: str | os.PathLike) -> bool:
    """Whether every rank sees the same ``output_dir`` (one volume on all nodes); collective.

    Sharded checkpoints need it: each rank writes its own shard into one folder. Node-local
    volumes would scatter a checkpoint across nodes.
    """
    if distributed.world_size() == 1:
        return True
    token = distributed.broadcast_object(f".shared-check-{os.getpid()}-{time.time_ns()}")
    probe = Path(output_dir) / token
    if distributed.rank() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
    distributed.barrier()
    shared = not distributed.any_rank(not probe.exists())
    distributed.barrier()
    if distributed.rank() == 0:
        probe.unlink(missing_ok=True)
    return shared
