"""Sharded, atomic, resumable training checkpoints.

Layout under ``output_dir/checkpoints/``::

    step-40/                  a complete checkpoint (only ever appears whole, by rename)
      state/                  torch.distributed.checkpoint: trainable weights + optimizer, one file per rank
      rng/rank-00000.pt       per-rank RNG states (python, numpy, torch CPU, CUDA)
      meta.json               written last: step, data position, scheduler, fingerprint, world size
    .tmp-step-50/             being written (or left by a crash): never loaded, removed on the next start

Every rank writes only its own shard (no gather of the whole model on rank 0), so saving is
as fast as the slowest rank's disk and loading works at any world size: DCP reshards DTensors.
Only trainable parameters are saved (``ignore_frozen_params``): for LoRA that is the adapter,
the frozen base comes back from ``model_dir``.

Typical use in a training loop (every call is collective: all ranks, same order)::

    fp = run_fingerprint(cfg)                       # model, method, dataset, batch shape
    if finished_run(output_dir, fp, {"max_steps": cfg.max_steps}, [output_dir / "adapter"]):
        return                                      # this job is already done
    if ckpt := find_resume(output_dir, cfg.resume):  # auto / never / a path; cleans .tmp-* leftovers
        resumed = load_checkpoint(ckpt, model, optimizer, scheduler, fingerprint=fp)
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
import errno
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pkg.trainer import distributed
from pkg.trainer.errors import TrainerError
from pkg.trainer.files import dir_digest, remove_tree, replace_dir, write_atomic

log = logging.getLogger("pkg.trainer")

CHECKPOINTS = "checkpoints"
META = "meta.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Trainable parameters only (the adapter for LoRA), sharded as they live on each rank.
_SAVE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# DCP has already verified that every saved key was found; frozen base weights are absent on purpose.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(TrainerError):
    """A checkpoint that cannot be used; the message is one line saying why and what to do."""


class CheckpointUnreadable(CheckpointError):
    """A complete checkpoint whose files fail to load (damaged in place); the message names the file."""


@dataclass
class Resumed:
    """What :func:`load_checkpoint` restored besides the tensors."""

    step: int
    data_state: dict[str, Any]
    path: Path | None = None  # the checkpoint loaded


# --------------------------------------------------------------------------- fingerprint (files.dir_digest)


def run_fingerprint(cfg: Any) -> dict[str, str]:
    """What a checkpoint of this run must agree on: model, method, dataset (and which tokens are targets)
    and batch shape.

    ``cfg`` is a TrainConfig. Settings a resumed run may change (``max_steps``, ``num_epochs``,
    learning rate, logging, ``save_every``...) are left out, so extending a run is allowed.
    """
    method = cfg.method
    if method != "full":
        targets = ",".join(cfg.lora_target_modules)
        method += f" (lora_rank={cfg.lora_rank}, lora_alpha={cfg.lora_alpha}, lora_target_modules={targets})"
        method += " with DoRA" * cfg.use_dora
    # Settings added later are named only when set, so older checkpoints keep their fingerprint.
    data_extra = "".join(
        f", {name}={getattr(cfg, name)}"
        for name, default in (("dataset_split", "train"), ("dataset_source", "auto"), ("column_map", {}),
                              ("system_prompt", ""), ("max_steps_per_epoch", 0), ("shuffle", True),
                              ("more_datasets", []), ("add_eos", True))
        if getattr(cfg, name) != default
    )  # fmt: skip
    fingerprint = {
        "model": f"{Path(cfg.model_dir).name} (content digest {dir_digest(cfg.model_dir)})",
        "method": method,
        "dataset": (
            f"{Path(cfg.dataset_dir).name} (content digest {dir_digest(cfg.dataset_dir)}, "
            f"dataset_format={cfg.dataset_format}, train_on_prompt={cfg.train_on_prompt}, "
            f"val_fraction={cfg.val_fraction}, seed={cfg.seed}{data_extra})"
        ),
        "batch": (
            f"global_batch_size={cfg.global_batch_size}, max_seq_length={cfg.max_seq_length}, "
            f"packing={cfg.packing}"
        ),
    }
    if getattr(cfg, "objective", "sft") != "sft":  # SFT fingerprints stay as they were
        fingerprint["objective"] = (
            f"{cfg.objective} (dpo_beta={cfg.dpo_beta}, dpo_loss={cfg.dpo_loss}, "
            f"dpo_label_smoothing={cfg.dpo_label_smoothing})"
        )
        if getattr(cfg, "reference_model_dir", ""):
            ref = cfg.reference_model_dir
            fingerprint["objective"] += f", reference {Path(ref).name} (content digest {dir_digest(ref)})"
    return fingerprint


def fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """One line naming what differs between two fingerprints, or None when they agree."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    return "; ".join(diffs) or None


def _attempt(fn: Any, what: str) -> str | None:
    """Run ``fn``; a failure becomes a one-line message instead of an exception on this rank only."""
    try:
        fn()
    except (OSError, TypeError, ValueError) as e:  # disk full, permissions, a non-JSON data_state
        return f"{what}: {e}{_space_hint(e)}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _space_hint(e: BaseException) -> str:
    """What to do when `e` is, or wraps, a full disk or quota."""
    seen: BaseException | None = e
    while seen is not None:
        full = isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return ": the volume of output_dir is full; free space or give it a larger volume"
        seen = seen.__cause__ or seen.__context__
    return ""


# --------------------------------------------------------------------------- files


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
            m = _STEP_DIR.match(p.name)
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
            incomplete_step = _STEP_DIR.match(p.name) and read_meta(p) is None
            if p.name.startswith((".tmp-", ".trash-")) or incomplete_step:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    distributed.barrier()
    return removed


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This process's random generators, as plain lists and tensors (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


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


def _check_shared_dir(tmp: Path) -> None:
    """Every rank must see the folder rank 0 created, or per-rank shards would scatter across nodes."""
    error = None
    if not tmp.is_dir():
        error = (
            f"checkpoint folder {tmp.parent} is not shared by all ranks: put output_dir on a volume "
            "every node mounts (ReadWriteMany), or set save_every: 0 to disable checkpoints"
        )
    distributed.agree(error, CheckpointError)


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
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "state")  # raises on every rank
    except Exception as e:  # DCP wraps each rank's OSError (a full disk) in its own exception
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {_first_line(e)}{_space_hint(e)}") from None
    rng_file = tmp / "rng" / f"rank-{rank:05d}.pt"
    distributed.agree(
        _attempt(lambda: torch.save(rng_state(), rng_file), f"cannot write {rng_file}"), CheckpointError
    )

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

    Refuses a checkpoint whose ``fingerprint`` differs, with a one-line reason (CheckpointError).
    The world size may differ from the saving run's: DCP reshards. Per-rank RNG states are restored
    when the world size matches (at another world size they cannot correspond rank by rank).
    """
    path = Path(path)
    meta = read_meta(path)
    missing = f"{path} is not a complete checkpoint (no {META} with complete: true)" if meta is None else None
    # Rank 0 found it complete when it chose it: a rank that cannot read it now sees a damaged one.
    distributed.agree(missing, CheckpointUnreadable)
    assert meta is not None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format_version')}, this trainer reads {FORMAT_VERSION}"
        )
    if fingerprint is not None and (why := fingerprint_mismatch(meta.get("fingerprint", {}), fingerprint)):
        raise CheckpointError(
            f"refusing checkpoint {path}: it was made for another run ({why}); "
            "use another output_dir or set resume: never to start over"
        )

    if optimizer is None:
        model_sd = get_state_dict(model, [], options=_SAVE_OPTIONS)[0]
        state: dict[str, Any] = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(model, _parts(optimizer), options=_SAVE_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
    # Any failure from here on is the checkpoint's files (the fingerprint matched): every rank learns of
    # it together, so a caller can fall back to an older checkpoint (load_resume) without a rank waiting.
    error, what = None, path / "state"
    try:
        dcp.load(state, checkpoint_id=what)  # raises on every rank when any rank's read failed
        what = f"{path / 'state'} (its tensors do not fit this model)"
        set_state_dict(
            model,
            _parts(optimizer) if optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state.get("optim", {}),
            options=_LOAD_OPTIONS,
        )
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


def _reason(e: BaseException) -> str:
    """One line for a load failure; DCP's own exception holds each failing rank's underneath."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    return f"{type(e).__name__}: {_first_line(e)}"


def load_resume(
    output_dir: str | os.PathLike,
    resume: str | bool | None,
    load: Any,
) -> Resumed | None:
    """:func:`find_resume`, then ``load(path)`` (a :func:`load_checkpoint` call); collective.

    When the newest checkpoint's files fail to load (bytes overwritten, an unreadable optimizer state or
    RNG file: damage :func:`damage`'s sizes do not see), it is moved aside like a damaged one and the
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
