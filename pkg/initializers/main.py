"""The run shared by both initializers: config -> marker check -> list -> filter -> plan -> fetch -> marker.

Exit codes: 0 success (or already complete), 1 an expected error (one line on stderr), 2 an unexpected bug
(redacted traceback on stderr), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM; a rerun resumes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from .config import Config, Kind, load_config
from .errors import InitializerError
from .filters import apply_filters
from .manifest import (
    Journal,
    check_state_dir,
    complete_manifest,
    remove_manifest,
    state_dir,
    write_manifest,
)
from .process import run_main
from .progress import Progress, human_bytes, log
from .sources import RemoteFile, open_source
from .transfer import Engine
from .uri import HfUri, LocalUri, S3Uri, StorageUri
from .workspace import check_contents, check_writable


def request_of(config: Config) -> dict[str, Any]:
    """What identifies a download request in the marker: the source and filters, never credentials."""
    request: dict[str, Any] = {"kind": config.kind, "storage_uri": str(config.uri)}
    if config.endpoint:
        request["endpoint"] = config.endpoint
    if isinstance(config.uri, HfUri):
        request["hf_endpoint"] = config.hf_endpoint  # never with a user:password@ (see config.hf_login)
    if config.patterns_given:
        request["allow_patterns"] = list(config.allow_patterns)
        request["ignore_patterns"] = list(config.ignore_patterns)
    return request


def no_file_folder_clash(files: list[RemoteFile]) -> None:
    """Refuse a selection that holds a file and a folder of one name (paths are validated, and unique, by
    `Listing`: nothing lands outside OUTPUT_PATH)."""
    folders = {parent for f in files for parent in _parents(f.path)}
    for f in files:
        if f.path in folders:
            raise InitializerError(
                f"refusing {f.key!r}: the source holds both a file and a folder named {f.path!r}"
            )


def model_at_top(uri: StorageUri, files: list[RemoteFile]) -> None:
    """Refuse a model whose config.json would land one folder down (STORAGE_URI=s3://BUCKET for a bucket
    holding MODEL/config.json), where the trainer would not find it, naming the STORAGE_URI that puts it at
    the top. A source with .json or .safetensors files at its top is a model root as it is (diffusers keep
    config.json files in sub-folders), and a Hub sub-path keeps its repo paths by design."""
    if isinstance(uri, HfUri) and uri.subpath:
        return
    if any("/" not in f.path and f.path.endswith((".json", ".safetensors")) for f in files):
        return
    folders = sorted({f.path.rsplit("/", 1)[0] for f in files if f.path.endswith("/config.json")})
    if not folders:
        return
    uris = [str(_below(uri, folder)) for folder in folders]
    if len(folders) == 1:
        raise InitializerError(
            f"{uri} holds the model one folder down ({folders[0]}/config.json), where the trainer would not "
            f"find it: set STORAGE_URI={uris[0]}"
        )
    raise InitializerError(
        f"{uri} holds {len(folders)} models in sub-folders ({', '.join(f + '/' for f in folders[:4])}"
        f"{', ...' if len(folders) > 4 else ''}) and none at its top: set STORAGE_URI to one, e.g. {uris[0]}"
    )


def _below(uri: StorageUri, folder: str) -> StorageUri:
    """`uri` narrowed to its sub-folder `folder`."""
    if isinstance(uri, S3Uri):
        return S3Uri(uri.bucket, "/".join(p for p in (uri.prefix.strip("/"), folder) if p))
    if isinstance(uri, HfUri):
        return HfUri(uri.repo_id, uri.revision, folder)
    return LocalUri(f"{uri.path.rstrip('/')}/{folder}")


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def run(config: Config) -> None:
    root = config.output_path
    request = request_of(config)
    check_state_dir(root)
    done = complete_manifest(root, request)
    if done:
        log(
            f"{config.kind} already complete in {root}: {done['total_files']} files, "
            f"{human_bytes(done['total_bytes'])} from {config.uri} (marker {state_dir(root)}/manifest.json)"
        )
        return
    source = open_source(config)
    lock: int | None = None
    try:
        check_writable(root)  # before the listing, which can take minutes
        check_state_dir(root)
        lock = exclusive(root)
        done = complete_manifest(root, request)
        if done:  # another run finished it while we waited for the lock
            log(f"{config.kind} completed by another run in {root}: {done['total_files']} files")
            return
        check_contents(root, request, config.overwrite)
        log(f"listing {config.uri}")
        listed = source.list_files()
        files, note = apply_filters(config, listed)
        log(f"{len(listed)} files listed, {len(files)} selected ({note})")
        if not files:
            raise InitializerError(
                f"nothing to download from {config.uri}: {len(listed)} files listed, none selected; "
                + (
                    "check ALLOW_PATTERNS / IGNORE_PATTERNS"
                    if listed
                    else "check the path and that it holds files"
                )
            )
        no_file_folder_clash(files)
        if config.kind == "model":
            model_at_top(config.uri, files)
        previous = remove_manifest(root, request)
        journal = Journal(root, request, previous)
        engine = Engine(source, root, config.tuning, journal)
        plan = engine.plan(files)
        engine.check_space(plan)
        if plan.skipped or plan.resumed_bytes:
            log(
                f"resuming: {len(plan.skipped)} files already complete, "
                f"{human_bytes(plan.resumed_bytes)} of partial files already fetched"
            )
        todo = len(plan.whole) + len(plan.multipart)
        log(f"downloading {todo} files ({human_bytes(plan.bytes_to_fetch)}) to {root}")
        progress = Progress(todo, plan.bytes_to_fetch, config.tuning.progress_interval).start()
        try:
            engine.run(plan, progress)
        finally:
            progress.close()
            journal.close()
        write_manifest(root, request, source.resolved(), files)
        seconds = progress.elapsed()
        log(
            f"done: {todo} files ({human_bytes(progress.bytes_done)}) downloaded, "
            f"{len(plan.skipped)} already present, in {seconds:.1f}s "
            f"({progress.bytes_done / seconds / 1e6:.1f} MB/s, "
            f"{progress.retries} retries) from {config.uri} to {root}"
        )
    finally:
        source.close()
        if lock is not None:
            os.close(lock)


def exclusive(root: Path) -> int:
    """Hold an exclusive lock on OUTPUT_PATH for this run, waiting for any other run to finish first."""
    fd = os.open(state_dir(root) / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another initializer is writing {root}; waiting for it")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def main(kind: Kind) -> int:
    """Entry point of `python -m pkg.initializers.{dataset,model}`; returns the exit code."""

    def body() -> None:
        config = load_config(kind)
        log(f"{kind} initializer: {config.uri} -> {config.output_path}")
        run(config)

    return run_main(body, "rerun to resume (finished files are kept)")
