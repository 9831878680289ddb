"""The one transfer engine every source shares.

Files go to a fixed set of worker threads through a bounded queue, filled as the workers take from it, so
memory does not grow with the number of files. A file larger than the part size gets a sparse temporary
file filled by parallel ranged requests written with `os.pwrite`; smaller files stream in one request.
A server that ignores Range (HTTP 200 with the whole file) gets that file, and every later large file, in
one stream each. Memory stays bounded (one chunk per worker) whatever the object size. Every request is
retried (retry.py) on TransientError (connection errors, stalled or trickling reads, 429, 5xx). Each file
is verified (size always; MD5, SHA-256 or git blob SHA-1 when the source gives one) and only then renamed
into place and recorded in the journal, so a rerun skips it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .blocks import blocks, md5_of
from .config import DEFAULT_PART_SIZE, MAX_AUTO_PART_SIZE, MiB, Tuning
from .errors import InitializerError, RangeIgnored, TransientError
from .manifest import Journal, start_writeback, state_dir
from .progress import Progress, human_bytes, log
from .retry import Cancelled, retry
from .safety import target_path
from .sources.base import RemoteFile, Source

QUEUE_PER_WORKER = 2  # tasks waiting per worker: enough to keep them busy, few enough to cost no memory
STOP_GRACE = 10.0  # seconds a stop waits for the workers (their reads are aborted, so they return at once)


@dataclass
class Plan:
    """What a run has to do after looking at the disk and the journal."""

    whole: list[RemoteFile]
    multipart: list[RemoteFile]
    skipped: list[RemoteFile]
    resumed_bytes: int  # bytes of finished parts found from a previous run

    @property
    def bytes_to_fetch(self) -> int:
        return sum(f.size for f in self.whole + self.multipart) - self.resumed_bytes

    def tasks(self, part_size: int) -> int:
        """How many requests the plan needs at most (one per whole file, one per part)."""
        return len(self.whole) + sum(-(-f.size // part_size) for f in self.multipart)


def choose_part_size(files: list[RemoteFile], tuning: Tuning) -> int:
    """INIT_PART_SIZE if set; else 16 MiB, grown (to 64 MiB at most, in whole MiB) while the large files
    still give every connection a part. It depends on the whole selection, not on what is left, so a
    rerun cuts the same parts and resumes them."""
    if tuning.part_size:
        return tuning.part_size
    large = sum(f.size for f in files if f.size > DEFAULT_PART_SIZE)
    share = -(-large // tuning.concurrency)  # ceil
    return min(max(DEFAULT_PART_SIZE, -(-share // MiB) * MiB), MAX_AUTO_PART_SIZE)


def _hasher(f: RemoteFile) -> tuple[str, hashlib._Hash, str] | None:
    """The strongest checksum the source gave for `f`: (name, hash object, expected hex digest)."""
    if f.sha256:
        return "sha256", hashlib.sha256(), f.sha256
    if f.md5:
        return "md5", hashlib.md5(usedforsecurity=False), f.md5
    if f.git_sha1:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % f.size)
        return "git-sha1", h, f.git_sha1
    return None


def _md5_of_parts(path: Path, sizes: list[int]) -> str:
    """MD5 of the concatenated MD5 digests of consecutive slices of `path` of these sizes ("" when the sizes
    do not cover the file)."""
    if sum(sizes) != path.stat().st_size:
        return ""
    digests, start = [], 0
    for size in sizes:
        digests.append(md5_of(path, start, size).digest())
        start += size
    return hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()


def _io_error(exc: OSError, root: Path) -> InitializerError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(root).free
        return InitializerError(
            f"no space left on the volume of OUTPUT_PATH={root} ({human_bytes(free)} free): "
            "use a larger volume or narrow the download with ALLOW_PATTERNS / IGNORE_PATTERNS"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InitializerError(
            f"cannot write to OUTPUT_PATH={root}: {exc.strerror}; check the volume permissions"
        )
    return InitializerError(f"error writing under OUTPUT_PATH={root}: {exc.strerror or exc}")


class Engine:
    def __init__(self, source: Source, root: Path, tuning: Tuning, journal: Journal):
        self.source = source
        self.root = root
        self.tuning = tuning
        self.journal = journal
        self.partial = state_dir(root) / "partial"
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._parts_left: dict[str, int] = {}
        self._streamed: set[str] = set()  # large files fetched in one stream after all (Range ignored)
        self._no_ranges: set[str] = set()  # hosts that answered a ranged GET with the whole file
        self._folders: set[Path] = set()  # output folders already created and checked
        self.part_size = tuning.part_size or DEFAULT_PART_SIZE
        self.progress: Progress | None = None

    # -- planning -------------------------------------------------------------------------------------------
    def _temp(self, f: RemoteFile) -> Path:
        return self.partial / hashlib.sha1(f.path.encode(), usedforsecurity=False).hexdigest()

    def _parts(self, f: RemoteFile) -> list[tuple[int, int, int]]:
        size = self.part_size
        return [(i, start, min(start + size, f.size)) for i, start in enumerate(range(0, f.size, size))]

    def plan(self, files: list[RemoteFile]) -> Plan:
        """Sort `files` into skipped (already complete), whole-file and multi-part downloads."""
        self.part_size = choose_part_size(files, self.tuning)
        self.partial.mkdir(parents=True, exist_ok=True)
        plan = Plan([], [], [], 0)
        for f in files:
            target = target_path(self.root, f.path, self._folders)
            if self.journal.has_file(f) and target.is_file() and target.stat().st_size == f.size:
                plan.skipped.append(f)
            elif f.size > self.part_size:
                plan.multipart.append(f)
                tmp = self._temp(f)
                if tmp.is_file() and tmp.stat().st_size == f.size:
                    done = self.journal.done_parts(f, self.part_size)
                    plan.resumed_bytes += sum(end - start for i, start, end in self._parts(f) if i in done)
            else:
                plan.whole.append(f)
        return plan

    def check_space(self, plan: Plan) -> None:
        need = plan.bytes_to_fetch
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise InitializerError(
                f"not enough space on the volume of OUTPUT_PATH={self.root}: need {human_bytes(need)}, "
                f"{human_bytes(free)} free; use a larger volume or narrow the download with ALLOW_PATTERNS"
            )

    # -- running --------------------------------------------------------------------------------------------
    def run(self, plan: Plan, progress: Progress) -> None:
        self.progress = progress
        count = plan.tasks(self.part_size)
        workers = max(1, min(self.tuning.concurrency, self.source.max_concurrency, count or 1))
        todo: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=QUEUE_PER_WORKER * workers)
        errors: list[BaseException] = []

        def work() -> None:
            while (task := todo.get()) is not None:
                if self._cancel.is_set():
                    continue  # stopping: drain the queue
                try:
                    task()
                except BaseException as exc:  # handed to the main thread
                    with self._lock:
                        errors.append(exc)
                    self._stop()

        threads = [threading.Thread(target=work, name=f"fetch-{i}", daemon=True) for i in range(workers)]
        for thread in threads:
            thread.start()
        try:
            for task in self._tasks(plan):
                while not self._cancel.is_set():
                    try:
                        todo.put(task, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._cancel.is_set():
                    break
            _join(todo, threads, self._cancel)
        except BaseException:  # SIGTERM / Ctrl-C in the main thread, or a task that could not be made
            self._stop()
            _join(todo, threads, self._cancel)
            raise
        if errors:
            raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])

    def _tasks(self, plan: Plan) -> Iterator[Callable[[], None]]:
        """The plan's requests, made as the queue takes them (a large file's temporary file is created when
        its first part is queued)."""
        for f in plan.multipart:
            yield from self._multipart_tasks(f)
        for f in plan.whole:
            yield partial(self._fetch_whole, f)

    def _stop(self) -> None:
        """Stop every worker: queued tasks are dropped, running ones stop at their next chunk, and reads in
        progress are aborted so a stalled server does not hold the stop."""
        self._cancel.set()
        self.source.abort()

    def _stream(self, f: RemoteFile, start: int, end: int, sink: Callable[[bytes, int], None]) -> None:
        """One attempt at bytes [start, end) fed to `sink(chunk, offset)`; short reads are transient."""
        assert self.progress is not None
        offset = start
        try:
            with self.source.open_range(f, start, end) as chunks:
                for chunk in chunks:
                    if self._cancel.is_set():
                        raise Cancelled()
                    if offset + len(chunk) > end:
                        raise TransientError(f"{f.path}: server sent more bytes than requested")
                    sink(chunk, offset)
                    offset += len(chunk)
                    self.progress.add_bytes(len(chunk))
            if offset != end:
                raise TransientError(
                    f"{f.path}: connection ended after {offset - start} of {end - start} bytes"
                )
        except BaseException:
            self.progress.add_bytes(start - offset)  # this attempt's bytes will be fetched again
            raise

    def _fetch_whole(self, f: RemoteFile) -> None:
        if self._cancel.is_set():
            raise Cancelled()
        tmp = self._temp(f)

        def attempt() -> None:
            check = _hasher(f)
            with open(tmp, "wb") as out:

                def sink(chunk: bytes, _offset: int) -> None:
                    out.write(chunk)
                    if check:
                        check[1].update(chunk)

                if f.size:
                    self._stream(f, 0, f.size, sink)
                    out.flush()
                    start_writeback(out.fileno())
            if check and check[1].hexdigest() != check[2] and self.source.verifiable(f):
                raise TransientError(
                    f"{f.path}: {check[0]} mismatch (got {check[1].hexdigest()}, want {check[2]})"
                )

        try:
            retry(attempt, f"download of {f.path}", self.tuning, self._retried, self._cancel)
            self._finish(f, tmp)
        except OSError as exc:
            raise _io_error(exc, self.root) from None

    def _multipart_tasks(self, f: RemoteFile) -> list[Callable[[], None]]:
        if self.source.host(f) in self._no_ranges:
            return [partial(self._fetch_whole, f)]  # this host ignores Range: one stream
        tmp = self._temp(f)
        parts = self._parts(f)
        done = (
            self.journal.done_parts(f, self.part_size)
            if tmp.is_file() and tmp.stat().st_size == f.size
            else set()
        )
        try:
            if not done:
                # Sparse: blocks are allocated as parts arrive, so a failed run holds only what it fetched
                # (check_space made sure the whole selection fits).
                with open(tmp, "wb") as out:
                    out.truncate(f.size)
        except OSError as exc:
            raise _io_error(exc, self.root) from None
        todo = [p for p in parts if p[0] not in done]
        self._parts_left[f.path] = len(todo)
        if not todo:
            return [lambda: self._finish_multipart(f, tmp)]
        return [partial(self._fetch_part, f, tmp, *p) for p in todo]

    def _fetch_part(self, f: RemoteFile, tmp: Path, index: int, start: int, end: int) -> None:
        if self._cancel.is_set():
            raise Cancelled()
        if f.path in self._streamed or self.source.host(f) in self._no_ranges:
            self._stream_instead(f)
            return
        try:
            fd = os.open(tmp, os.O_WRONLY)
            try:
                retry(
                    lambda: self._stream(f, start, end, lambda chunk, off: _pwrite_all(fd, chunk, off)),
                    f"download of {f.path} bytes {start}-{end - 1}",
                    self.tuning,
                    self._retried,
                    self._cancel,
                )
                start_writeback(fd, start, end - start)
            except RangeIgnored as exc:
                self._ranges_ignored(exc.host)
            finally:
                os.close(fd)
            if f.path in self._streamed or self.source.host(f) in self._no_ranges:
                self._stream_instead(f)
                return
            self.journal.part_done(f, index, self.part_size)
            with self._lock:
                self._parts_left[f.path] -= 1
                last = self._parts_left[f.path] == 0
            if last:
                self._finish_multipart(f, tmp)
        except OSError as exc:
            raise _io_error(exc, self.root) from None

    def _ranges_ignored(self, host: str) -> None:
        with self._lock:
            first = host not in self._no_ranges
            self._no_ranges.add(host)
        if first:
            log(
                f"{host or 'the server'} ignores Range requests (it answered HTTP 200 with the whole file): "
                "its large files are downloaded in one stream each"
            )

    def _stream_instead(self, f: RemoteFile) -> None:
        """Fetch `f` in one stream, once, whichever of its part tasks gets here first; the others are done."""
        with self._lock:
            if f.path in self._streamed:
                return
            self._streamed.add(f.path)
        self._fetch_whole(f)

    def _finish_multipart(self, f: RemoteFile, tmp: Path) -> None:
        check = _hasher(f) if self.source.verifiable(f) else None
        if check:
            for block in blocks(tmp):
                check[1].update(block)
            if check[1].hexdigest() != check[2]:
                tmp.unlink(missing_ok=True)
                raise InitializerError(
                    f"{f.path}: {check[0]} mismatch after download (got {check[1].hexdigest()}, "
                    f"want {check[2]}); the source may have changed during the download, rerun to fetch it "
                    "again"
                )
        self._finish(f, tmp)

    def _finish(self, f: RemoteFile, tmp: Path) -> None:
        size = tmp.stat().st_size
        if size != f.size:
            raise InitializerError(
                f"{f.path}: wrote {size} bytes, expected {f.size}; rerun to fetch it again"
            )
        if f.md5_of_parts and self.source.verifiable(f):
            self._check_md5_of_parts(f, tmp)
        elif f.md5_of_parts:
            self._check_part_structure(f)
        os.replace(tmp, target_path(self.root, f.path, self._folders))
        self.journal.file_done(f)
        assert self.progress is not None
        self.progress.file_done()

    def _check_md5_of_parts(self, f: RemoteFile, tmp: Path) -> None:
        """An S3 multipart ETag is the MD5 of the parts' MD5s: rebuild it from the file and the upload's
        part sizes (guessed from part 1; asked part by part only if the guess does not match)."""
        want = (f.md5_of_parts or "").split("-")[0]
        guess = self.source.part_sizes(f)
        if guess and _md5_of_parts(tmp, guess) == want:
            return
        exact = self.source.part_sizes(f, exact=True)
        if exact is None or (exact != guess and _md5_of_parts(tmp, exact) == want):
            return
        tmp.unlink(missing_ok=True)
        raise InitializerError(
            f"{f.path}: content does not match its multipart ETag {f.md5_of_parts}; the source may have "
            "changed during the download, rerun to fetch it again"
        )

    def _check_part_structure(self, f: RemoteFile) -> None:
        """For a multipart object whose ETag is not built from MD5s (SSE-KMS / SSE-C): its parts, as the
        store reports them, must be as many as the ETag says and add up to the size downloaded."""
        count = int((f.md5_of_parts or "").rsplit("-", 1)[1])
        sizes = self.source.part_sizes(f, exact=True)
        if sizes is not None and (len(sizes) != count or sum(sizes) != f.size):
            raise InitializerError(
                f"{f.path}: its parts ({len(sizes)}, {sum(sizes)} bytes) do not match its ETag "
                f"{f.md5_of_parts} and size {f.size}; the source may have changed during the download, rerun"
            )

    def _retried(self) -> None:
        assert self.progress is not None
        self.progress.retried()


def _join(
    todo: queue.Queue[Callable[[], None] | None], threads: list[threading.Thread], cancel: threading.Event
) -> None:
    """Tell the workers there is no more work and wait for them; when stopping, drop what is still queued
    and wait at most STOP_GRACE (their reads are aborted; a thread stuck anyway must not hold the exit)."""
    if not cancel.is_set():
        for _ in threads:
            todo.put(None)
        for thread in threads:
            thread.join()
        return
    with contextlib.suppress(queue.Empty):
        while True:
            todo.get_nowait()
    for _ in threads:
        with contextlib.suppress(queue.Full):
            todo.put_nowait(None)
    deadline = time.monotonic() + STOP_GRACE
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))


def _pwrite_all(fd: int, chunk: bytes, offset: int) -> None:
    view = memoryview(chunk)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
