"""Saving and loading sharded, atomic training checkpoints (torch.distributed.checkpoint).

Layout under ``output_dir/checkpoints/`` (checkpoint_dirs lists, checks and chooses them)::

    step-40/                  a complete checkpoint (only ever appears whole, by rename)
      state/                  torch.distributed.checkpoint: trainable weights + optimizer, one file per rank,
                              each tensor as its bytes (checkpoint_storage.py)
      rng/rank-00000.pt       per-rank RNG states (python, numpy, torch CPU, CUDA)
      meta.json               written last: step, data position, scheduler, fingerprint, world size,
                              each file's size and XXH3-128 digest (checksums.py)
    .tmp-step-50/             being written (or left by a crash): never loaded, removed on the next start

Every rank writes only its own shard (no gather of the whole model on rank 0), so saving is
as fast as the slowest rank's disk and loading works at any world size: DCP reshards DTensors.
Only trainable parameters are saved (``ignore_frozen_params``): for LoRA that is the adapter,
the frozen base comes back from ``model_dir``.

Typical use in a training loop (every call is collective: all ranks, same order)::

    fp = fingerprint.run_fingerprint(cfg)           # model, method, dataset, batch shape
    if checkpoint_dirs.finished_run(output_dir, fp, {"max_steps": cfg.max_steps}, [output_dir / "adapter"]):
        return                                      # this job is already done
    load = lambda path: load_checkpoint(path, model, optimizer, scheduler, fingerprint=fp)
    if resumed := load_resume(output_dir, cfg.resume, load):  # auto / never / a path; falls back past damage
        start_step, data_state = resumed.step, resumed.data_state
        Metrics(...).rewind(start_step)                               # metrics.py: one history
    ...
    save_checkpoint(output_dir, step, model, optimizer, scheduler,
                    fingerprint=fp, data_state={...}, keep_last=cfg.keep_last)

A failure on one rank (disk full, a folder not shared across nodes, a foreign checkpoint) raises
the same one-line :class:`CheckpointError` on every rank, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pkg.trainer import checkpoint_storage, checksums, distributed
from pkg.trainer.checkpoint_dirs import (
    META,
    checkpoints_dir,
    file_sizes,
    find_resume,
    list_checkpoints,
    move_aside,
    read_meta,
    resume_mode,
)
from pkg.trainer.disk_space import space_hint
from pkg.trainer.errors import CheckpointError, CheckpointUnreadable, first_line
from pkg.trainer.files import remove_tree, replace_dir, write_atomic
from pkg.trainer.fingerprint import fingerprint_mismatch
from pkg.trainer.rng import rng_state, set_rng_state

log = logging.getLogger("pkg.trainer")

FORMAT_VERSION = 2  # 2: tensors stored as their bytes (checkpoint_storage); 1: one torch.save archive each
READS = (1, 2)
# Trainable parameters only (the adapter for LoRA), sharded as they live on each rank.
_SAVE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# DCP has already verified that every saved key was found; frozen base weights are absent on purpose.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@dataclass
class Resumed:
    """What :func:`load_checkpoint` restored besides the tensors."""

    step: int
    data_state: dict[str, Any]
    path: Path | None = None  # the checkpoint loaded


def _attempt(fn: Any, what: str) -> str | None:
    """Run ``fn``; a failure becomes a one-line message instead of an exception on this rank only."""
    try:
        fn()
    except (OSError, TypeError, ValueError) as e:  # disk full, permissions, a non-JSON data_state
        return f"{what}: {e}{space_hint(e)}"
    return None


def _check_shared_dir(tmp: Path) -> None:
    """Every rank must see the folder rank 0 created, or per-rank shards would scatter across nodes."""
    error = None
    if not tmp.is_dir():
        error = (
            f"checkpoint folder {tmp.parent} is not shared by all ranks: put output_dir on a volume "
            "every node mounts (ReadWriteMany), or set save_every: 0 to disable checkpoints"
        )
    distributed.agree(error, CheckpointError)


@contextlib.contextmanager
def _alone() -> Iterator[bool]:
    """Whether this process saves or loads alone (world size 1): then DCP plans without its collectives,
    which pickle the whole plan through the process group, and need not warn that it does."""
    alone = distributed.world_size() == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield alone


def _save_synced(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` and sync it: on disk before meta.json says the checkpoint is complete (a
    crash must not leave a complete-looking checkpoint with a torn file after the older ones were pruned)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _parts(optimizer: Any) -> Any:
    """What DCP takes: an optimizer stepped in the backward (optim.InBackward) is one per parameter."""
    return getattr(optimizer, "optimizers", optimizer)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    *,
    fingerprint: Mapping[str, Any],
    data_state: Mapping[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Save a checkpoint of ``step`` atomically; collective (every rank calls it).

    All ranks write their shards into ``.tmp-step-N``; after a barrier rank 0 writes ``meta.json``
    (the completeness marker) and renames the folder to ``step-N``; then the oldest complete
    checkpoints beyond ``keep_last`` (>= 1) are deleted. Returns the final path.
    ``data_state`` (data position) must be JSON-serialisable.
    """
    root = checkpoints_dir(output_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    rank, world = distributed.rank(), distributed.world_size()
    started = time.perf_counter()

    def prepare() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)

    distributed.agree(_attempt(prepare, f"cannot create {tmp}") if rank == 0 else None, CheckpointError)
    _check_shared_dir(tmp)

    model_sd, optim_sd = get_state_dict(model, _parts(optimizer), options=_SAVE_OPTIONS)
    writer = checkpoint_storage.Writer(tmp / "state")
    try:  # raises on every rank
        with _alone() as alone:
            state = {"model": model_sd, "optim": optim_sd}
            dcp.save(state, checkpoint_id=tmp / "state", storage_writer=writer, no_dist=alone)
    except Exception as e:  # DCP wraps each rank's OSError (a full disk) in its own exception
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {first_line(e)}{space_hint(e)}") from None
    rng_file = tmp / "rng" / f"rank-{rank:05d}.pt"
    distributed.agree(
        _attempt(lambda: _save_synced(rng_state(), rng_file), f"cannot write {rng_file}"), CheckpointError
    )
    # The shards were hashed as they were written; the rest while still in the page cache.
    digests = checksums.record(tmp, {f"state/{name}": d for name, d in writer.digests.items()})

    def finalize() -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "fingerprint": dict(fingerprint),
            "data_state": dict(data_state or {}),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "torch_version": torch.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "save_seconds": round(time.perf_counter() - started, 3),
            "files": file_sizes(tmp),  # what resume checks the files against (a truncated shard)
            "digests": digests,  # and their bytes (a changed byte inside a shard)
            "complete": True,
        }
        write_atomic(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, final)  # re-saving a step (after a resume): the older copy goes once replaced
        for _, stale in list_checkpoints(output_dir)[: -max(1, keep_last)]:
            remove_tree(stale)
        log.info("checkpoint %s saved in %.1fs", final, time.perf_counter() - started)

    # Every shard is on disk (DCP and the check above are collective); then the marker, then the rename.
    distributed.agree(
        _attempt(finalize, f"cannot complete checkpoint {final}") if rank == 0 else None, CheckpointError
    )
    return final


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    fingerprint: Mapping[str, Any] | None = None,
) -> Resumed:
    """Load a complete checkpoint into an already built (and sharded) model and optimizer; collective.

    Refuses a checkpoint whose ``fingerprint`` differs, with a one-line reason (CheckpointError), and
    one whose files differ from their recorded digests (CheckpointUnreadable, as a file that fails to load).
    The world size may differ from the saving run's: DCP reshards. Per-rank RNG states are restored
    when the world size matches (at another world size they cannot correspond rank by rank).
    """
    path = Path(path)
    meta = read_meta(path)
    missing = f"{path} is not a complete checkpoint (no {META} with complete: true)" if meta is None else None
    # Rank 0 found it complete when it chose it: a rank that cannot read it now sees a damaged one.
    distributed.agree(missing, CheckpointUnreadable)
    assert meta is not None
    if meta.get("format_version") not in READS:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format_version')}, this trainer reads "
            f"{' and '.join(map(str, READS))}: resume it with the trainer version that saved it"
        )
    if fingerprint is not None and (why := fingerprint_mismatch(meta.get("fingerprint", {}), fingerprint)):
        raise CheckpointError(
            f"refusing checkpoint {path}: it was made for another run ({why}); "
            "use another output_dir or set resume: never to start over"
        )
    if isinstance(meta.get("digests"), dict):
        checksums.verify(path, meta["digests"])  # damaged: CheckpointUnreadable, as a failed load below
    elif distributed.rank() == 0:
        log.info("checkpoint %s has no file digests (saved before they were recorded): its files are checked "
                 "by size only", path)  # fmt: skip

    if optimizer is None:
        model_sd = get_state_dict(model, [], options=_SAVE_OPTIONS)[0]
        state: dict[str, Any] = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(model, _parts(optimizer), options=_SAVE_OPTIONS)
        # Param groups are read as saved and matched to this optimizer's by parameter name: their layout
        # differs between stepping after the backward (two groups) and in it (one per parameter), and a
        # checkpoint of either resumes in the other (optimizer_in_backward: auto turns off when max_grad_norm
        # is set on resume). Each parameter's state (moments, step count) is keyed by its name already.
        groups = optim_sd.pop("param_groups")
        state = {"model": model_sd, "optim": optim_sd}
    # Any failure from here on is the checkpoint's files (the fingerprint matched): every rank learns of
    # it together, so a caller can fall back to an older checkpoint (load_resume) without a rank waiting.
    error, what = None, path / "state"
    try:
        if optimizer is not None:
            optim_sd["param_groups"] = _saved_groups(path / "state")
        with _alone() as alone:  # raises on every rank when any rank's read failed
            dcp.load(state, checkpoint_id=what, storage_reader=checkpoint_storage.Reader(what), no_dist=alone)
        what = f"{path / 'state'} (its tensors do not fit this model)"
        # A stateless optimizer (SGD without momentum) has no state to set: DCP would take its empty state
        # for one already split per optimizer and hand each per-parameter optimizer every group.
        stateful = optimizer is not None and bool(optim_sd["state"])
        set_state_dict(
            model,
            _parts(optimizer) if stateful else [],
            model_state_dict=state["model"],
            optim_state_dict={"state": optim_sd["state"], "param_groups": groups} if stateful else {},
            options=_LOAD_OPTIONS,
        )
        if optimizer is not None:
            _set_group_options(optimizer, groups, optim_sd["param_groups"])
        what = f"{path / META} (scheduler)"
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        what = path / "rng" / f"rank-{distributed.rank():05d}.pt"
        if meta.get("world_size") == distributed.world_size() and what.exists():
            set_rng_state(torch.load(what, weights_only=True))
    except (Exception, dcp.api.CheckpointException) as e:  # DCP's is a BaseException: not Exception
        error = f"{what} cannot be read: {_reason(e)}"
    distributed.agree(error, CheckpointUnreadable)
    return Resumed(step=int(meta["step"]), data_state=dict(meta.get("data_state") or {}), path=path)


def _saved_groups(state_dir: Path) -> list[dict[str, Any]]:
    """A DCP template of the optimizer's param groups as saved (their keys: "optim.param_groups.I.KEY")."""
    try:
        keys = checkpoint_storage.Reader(state_dir).read_metadata().state_dict_metadata
    except Exception:  # unreadable: dcp.load fails on every rank alike, which this rank must reach too
        return []
    groups: dict[int, dict[str, Any]] = {}
    for key in keys:
        if key.startswith("optim.param_groups."):
            index, option = key.removeprefix("optim.param_groups.").split(".", 1)
            groups.setdefault(int(index), {})[option] = None
    return [groups[i] for i in sorted(groups)]


def _set_group_options(optimizer: Any, groups: list[dict], saved: list[dict]) -> None:
    """Give each param group of `optimizer` (`groups`: the same by parameter name) the options (lr, betas,
    weight decay ...) of the saved group that holds its first parameter."""
    parts = _parts(optimizer)
    live = [g for part in (parts if isinstance(parts, list) else [parts]) for g in part.param_groups]
    by_name = {name: group for group in saved for name in group.get("params") or []}
    for group, names in zip(live, groups, strict=True):
        source = by_name.get(names["params"][0]) if names["params"] else None
        if source is not None:
            group.update({k: v for k, v in source.items() if k != "params"})


def _reason(e: BaseException) -> str:
    """One line for a load failure; DCP's own exception holds each failing rank's underneath."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    return f"{type(e).__name__}: {first_line(e)}"


def load_resume(
    output_dir: str | os.PathLike,
    resume: str | bool | None,
    load: Any,
) -> Resumed | None:
    """:func:`find_resume`, then ``load(path)`` (a :func:`load_checkpoint` call); collective.

    When the newest checkpoint's files differ from their digests or fail to load (bytes overwritten, an
    unreadable optimizer state or RNG file: damage the sizes checked by checkpoint_dirs.damage do not
    see), it is moved aside like a damaged one and the
    previous complete checkpoint is loaded instead. A failed load may have written part of the model and
    optimizer, so the older checkpoint must overwrite it: with none left the run stops, in one line,
    rather than train from half-loaded weights (a rerun starts over). A checkpoint named in ``resume``
    is not replaced by another.
    """
    failed = None
    while (path := find_resume(output_dir, resume)) is not None:
        try:
            return load(path)
        except CheckpointUnreadable as e:
            if resume_mode(resume) == "path" and read_meta(resume):  # this one, no other
                raise CheckpointError(
                    f"resume: checkpoint {path} is damaged ({e}): name an older checkpoint, or use "
                    "resume: auto"
                ) from None
            if distributed.rank() == 0:
                move_aside(path, str(e))
            distributed.barrier()
            failed = (path, e)
    if failed:
        path, e = failed
        raise CheckpointError(
            f"checkpoint {path} is damaged ({e}) and no older complete checkpoint is left (it was moved "
            f"aside to corrupt-{path.name}): rerun the job to start over"
        )
    return None
