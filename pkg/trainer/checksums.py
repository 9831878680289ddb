"""Digests of a checkpoint's files, so that a changed byte inside a tensor file is found before it is loaded.

A flipped bit in a shard keeps its size and usually still loads: without a digest the run would resume from
corrupt weights. At save every rank hashes the files it wrote while they are still in the page cache (its DCP
shards ``__<rank>_<n>.distcp`` and its RNG state) and rank 0 the rest (DCP's ``.metadata``); ``meta.json``
keeps them as ``{relative path: "sha256:<hex>"}``. At load the ranks share the files (largest first, in
turn) and agree: a mismatch makes the checkpoint unreadable, which ``load_resume`` moves aside as
``corrupt-step-N`` before falling back to the previous one. The check comes before the load, not beside
it, so damaged bytes never reach DCP's reader (a changed length could ask it for any amount of memory).

sha256, not blake2b: with the SHA extensions of current x86 and ARM CPUs it is the faster of the two
(docs/trainer.md has the figures).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pkg.trainer import distributed
from pkg.trainer.errors import CheckpointError, CheckpointUnreadable

ALGORITHM = "sha256"
SKIP = "meta.json"  # written after the digests, and holds them


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return f"{ALGORITHM}:{hashlib.file_digest(f, ALGORITHM).hexdigest()}"


def written_by(folder: Path, rank: int) -> list[Path]:
    """The files of a checkpoint being saved in `folder` that `rank` wrote itself."""
    return [*sorted((folder / "state").glob(f"__{rank}_*.distcp")), folder / "rng" / f"rank-{rank:05d}.pt"]


def record(folder: Path) -> dict[str, str]:
    """{relative path: digest} of every file under `folder` (but meta.json), complete on rank 0; collective.

    Each rank hashes the files it wrote; rank 0 also hashes any file no rank claimed, so a file DCP names
    otherwise is still covered. A file that cannot be read back fails the save on every rank.
    """
    mine: dict[str, str] = {}
    error = None
    try:
        for path in written_by(folder, distributed.rank()):
            if path.is_file():
                mine[path.relative_to(folder).as_posix()] = file_digest(path)
    except OSError as e:
        error = f"cannot read back {e.filename or folder} to record its digest: {e.strerror or e}"
    gathered = distributed.all_gather(mine if error is None else error)
    if failed := next((g for g in gathered if isinstance(g, str)), None):
        raise CheckpointError(failed)  # every rank gathered the same list: all raise together
    digests = {name: digest for part in gathered for name, digest in part.items()}
    if distributed.rank() == 0:
        for path in sorted(folder.rglob("*")):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and name != SKIP and name not in digests:
                digests[name] = file_digest(path)
    return digests


def verify(folder: Path, digests: Mapping[str, str]) -> None:
    """Check `folder`'s files against `digests`, the ranks sharing the work; collective. Raises
    CheckpointUnreadable on every rank, naming the first file that differs, if any rank found one."""
    rank, world = distributed.rank(), distributed.world_size()

    def size(name: str) -> int:
        try:
            return (folder / name).stat().st_size
        except OSError:
            return 0

    error = None
    for name in sorted(digests, key=lambda n: (-size(n), n))[rank::world]:
        try:
            found = file_digest(folder / name)
        except OSError as e:
            error = f"{folder / name} cannot be read: {e.strerror or e}"
            break
        if found != digests[name]:
            error = f"{folder / name} does not match the {ALGORITHM} digest recorded when it was saved"
            break
    distributed.agree(error, CheckpointUnreadable)
