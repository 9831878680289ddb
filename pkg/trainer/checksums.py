"""Digests of a checkpoint's files, so that a changed byte inside a tensor file is found before it is loaded.

A flipped bit in a shard keeps its size and usually still loads: without a digest the run would resume from
corrupt weights. At save every rank hashes the files it wrote (its DCP shards ``__<rank>_<n>.distcp``, as
checkpoint_storage writes them, and its RNG state while it is still in the page cache) and rank 0 the rest
(DCP's ``.metadata``); ``meta.json``
keeps them as ``{relative path: "xxh3-128:<hex>"}``. At load the ranks share the files (largest first, in
turn) and agree: a mismatch makes the checkpoint unreadable, which ``load_resume`` moves aside as
``corrupt-step-N`` before falling back to the previous one. The check comes before the load, not beside
it, so damaged bytes never reach DCP's reader (a changed length could ask it for any amount of memory).

XXH3-128, not a cryptographic hash: what is guarded against is damage (a bad disk, a torn copy, a bit flipped
in transit or in memory), not someone who rewrites a checkpoint on purpose, who could rewrite meta.json as
well. Any change of a few bits changes a 128-bit XXH3 digest; it runs ~10x faster than sha256 (docs/trainer.md
has the figures), so the check costs a few percent of a save or load instead of doubling the load.
Checkpoints saved with sha256 digests (before) are still checked with sha256: each digest names its algorithm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import xxhash

from pkg.trainer import distributed
from pkg.trainer.errors import CheckpointError, CheckpointUnreadable

ALGORITHM = "xxh3-128"
# How each algorithm a checkpoint may name is computed; sha256 is what earlier trainers recorded.
HASHERS: dict[str, Callable[[], Any]] = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}
SKIP = "meta.json"  # written after the digests, and holds them
_CHUNK = 4 << 20  # few syscalls; one buffer, not one allocation per read


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """``"<algorithm>:<hex>"`` of the file at `path`, read in large chunks into one reused buffer."""
    h = HASHERS[algorithm]()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return f"{algorithm}:{h.hexdigest()}"


def written_by(folder: Path, rank: int) -> list[Path]:
    """The files of a checkpoint being saved in `folder` that `rank` wrote itself."""
    return [*sorted((folder / "state").glob(f"__{rank}_*.distcp")), folder / "rng" / f"rank-{rank:05d}.pt"]


def record(folder: Path, hashed: Mapping[str, str] | None = None) -> dict[str, str]:
    """{relative path: digest} of every file under `folder` (but meta.json), complete on rank 0; collective.

    Each rank hashes the files it wrote, but those in `hashed` ({relative path: digest}, hashed while they
    were written); rank 0 also hashes any file no rank claimed, so a file DCP names otherwise is still
    covered. A file that cannot be read back fails the save on every rank.
    """
    mine: dict[str, str] = dict(hashed or {})
    error = None
    try:
        for path in written_by(folder, distributed.rank()):
            name = path.relative_to(folder).as_posix()
            if name not in mine and path.is_file():
                mine[name] = file_digest(path)
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
    CheckpointUnreadable on every rank, naming the first file that differs, if any rank found one, and
    CheckpointError (not damage: nothing is moved aside) for a digest of an algorithm this trainer lacks."""
    rank, world = distributed.rank(), distributed.world_size()
    unknown = sorted({str(d).partition(":")[0] for d in digests.values()} - HASHERS.keys())
    if unknown:
        raise CheckpointError(
            f"{folder / SKIP} records file digests of an unknown kind ({', '.join(unknown)}): resume it with "
            "the trainer version that saved it"
        )  # every rank read the same meta.json: all raise together

    def size(name: str) -> int:
        try:
            return (folder / name).stat().st_size
        except OSError:
            return 0

    error = None
    for name in sorted(digests, key=lambda n: (-size(n), n))[rank::world]:
        algorithm = digests[name].partition(":")[0]
        try:
            found = file_digest(folder / name, algorithm)
        except OSError as e:
            error = f"{folder / name} cannot be read: {e.strerror or e}"
            break
        if found != digests[name]:
            error = f"{folder / name} does not match the {algorithm} digest recorded when it was saved"
            break
    distributed.agree(error, CheckpointUnreadable)
