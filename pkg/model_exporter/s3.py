"""S3 destination: parallel multipart uploads with bounded memory, verified, resumable, a manifest last.

- Credentials, region, endpoint, STS role, redaction and the mapping of botocore errors to retries or
  one-line messages are the initializers' (`S3Source`): one S3 client setup for both directions.
- Every file at or under the part size is one PutObject; a larger one is a multipart upload whose parts go to
  the worker threads with every other file's. A part streams from the file (`FileSlice`), so memory does not
  grow with the part size or the number of workers (botocore reads the body in blocks).
- Each request carries the MD5 of what it sends (Content-MD5: the server refuses a body that does not match),
  each answer's ETag is compared with it, and the completed object's ETag with the MD5 of the part MD5s
  (or, on stores that give a multipart object its plain MD5, with that).
- Resume: objects already at the destination with the same size and MD5 (single or multipart form) are
  skipped; for a large file, an unfinished multipart upload of its key (ListMultipartUploads) is continued:
  the parts it holds whose size and ETag match the file's are kept, the others sent again.
- The manifest (`.model-exporter/manifest.json` under the prefix: every file with its size and MD5, and the
  run's summary) is removed before anything is written and put back last, so a reader that waits for it
  never takes a half-export for a complete one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import botocore.exceptions

from pkg.initializers.errors import InitializerError, TransientError
from pkg.initializers.progress import Progress, human_bytes, log
from pkg.initializers.sources.base import RemoteFile
from pkg.initializers.sources.s3 import S3Source
from pkg.initializers.transfer import retry
from pkg.initializers.uri import S3Uri

from .config import ExportConfig
from .outputs import LocalFile, Selection, md5_of

T = TypeVar("T")
MANIFEST = ".model-exporter/manifest.json"
MAX_PARTS = 10_000  # S3's limit per multipart upload
# Half the downloads' 16 MiB: a part is sent once its MD5 is known, and smaller parts keep more of them in
# flight (bench/bench_exporter.py: 16 MiB parts were 0.55-0.75x `aws s3 sync`, 8 MiB about even).
UPLOAD_PART_SIZE = 8 * 1024 * 1024
_WRITE_DENIED = {"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of a file as a seekable stream: a part is read from disk as botocore
    sends it (and as it hashes it for the signature), never held whole."""

    def __init__(self, path: Path, start: int, length: int):
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._pos
        size = left if size is None or size < 0 else min(size, left)
        if size <= 0:
            return b""
        data = os.pread(self._fd, size, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass
class _Upload:
    """One file's multipart upload: its id, and the ETag of each part once it is on the server."""

    file: LocalFile
    key: str
    part_size: int
    upload_id: str = ""
    etags: dict[int, str] = field(default_factory=dict)
    md5s: dict[int, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def count(self) -> int:
        return max(1, -(-self.file.size // self.part_size))

    def span(self, number: int) -> tuple[int, int]:
        start = (number - 1) * self.part_size
        return start, min(self.part_size, self.file.size - start)


def part_size_for(size: int, configured: int) -> int:
    """INIT_PART_SIZE (default 8 MiB), grown for a file that would need more than S3's 10,000 parts."""
    part = configured or UPLOAD_PART_SIZE
    return max(part, -(-size // MAX_PARTS))


class S3Export:
    def __init__(self, config: ExportConfig):
        uri = config.shared.uri
        assert isinstance(uri, S3Uri)
        self.uri = uri
        self.tuning = config.shared.tuning
        # Content-MD5 is each request's checksum; botocore's default CRC32 on top would be a third hash of
        # every byte (with the SigV4 payload hash), for nothing the MD5 does not already check.
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        self.source = S3Source(uri, config.shared)  # credentials, region, endpoint, listing, errors
        prefix = uri.prefix
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.bucket = uri.bucket
        self.progress: Progress | None = None
        self._cancel = threading.Event()

    @property
    def client(self) -> Any:
        return self.source.client  # may be replaced when the bucket turns out to be in another region

    def location(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{path}"

    # -- requests -------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], what: str) -> T:
        """`fn` with the initializers' retry policy; botocore errors become retries or one-line errors."""

        def once() -> T:
            try:
                return fn()
            except botocore.exceptions.ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _WRITE_DENIED:
                    raise InitializerError(
                        f"S3 denied {what} ({code}): check ACCESS_KEY_ID / SECRET_ACCESS_KEY / ROLE_ARN "
                        f"and that the credentials may write to {self.location()}"
                    ) from None
                raise self.source._translate(exc, what) from None
            except (InitializerError, TransientError):
                raise
            except Exception as exc:
                translated = self.source._translate(exc, what)
                if translated is exc:
                    raise
                raise translated from None

        on_retry = self.progress.retried if self.progress else None
        return retry(once, what, self.tuning, on_retry=on_retry)

    # -- the run --------------------------------------------------------------------------------------------
    def export(self, selection: Selection, manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload every file of `selection` and then the manifest; returns the manifest written."""
        self._remove_manifest()
        existing = {f.path: f for f in self.source.list_files()}
        part_size = part_size_for(max(f.size for f in selection.files), self.tuning.part_size)
        todo, skipped, entries = [], 0, {}
        for f in selection.files:
            found = existing.get(f.path)
            digest = self._same(f, found, part_size) if found else None
            if digest:
                skipped += 1
                entries[f.path] = {"path": f.path, "size": f.size, "etag": digest}
            else:
                todo.append(f)
        if skipped:
            log(f"resuming: {skipped} files already at {self.location()} with the same size and checksum")
        total = sum(f.size for f in todo)
        log(f"uploading {len(todo)} files ({human_bytes(total)}) to {self.location()}")
        self.progress = Progress(len(todo), total, self.tuning.progress_interval).start()
        try:
            entries.update(self._upload_all(todo, part_size))
        finally:
            self.progress.close()
        manifest = {**manifest, "files": [entries[f.path] for f in selection.files]}
        body = (json.dumps(manifest, indent=2) + "\n").encode()
        self._call(
            lambda: self.client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + MANIFEST,
                Body=body,
                ContentMD5=base64.b64encode(md5_of_bytes(body)).decode(),
                ContentType="application/json",
            ),
            f"writing {self.location(MANIFEST)}",
        )
        seconds = self.progress.elapsed()
        log(
            f"uploaded {len(todo)} files ({human_bytes(self.progress.bytes_done)}) in {seconds:.1f}s "
            f"({self.progress.bytes_done / seconds / 1e6:.1f} MB/s, {self.progress.retries} retries), "
            f"{skipped} already there; manifest {self.location(MANIFEST)} written last"
        )
        return manifest

    def _remove_manifest(self) -> None:
        """A previous export's manifest goes first: until this one ends, the prefix is not complete."""
        key = self.prefix + MANIFEST
        self._call(
            lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
            f"removing the previous manifest {self.location(MANIFEST)}",
        )

    def _same(self, f: LocalFile, found: RemoteFile, part_size: int) -> str | None:
        """The object's ETag when it holds `f` already (same size and MD5, in the form the store gave)."""
        if found.size != f.size:
            return None
        if found.md5:
            return found.md5 if md5_of(f.source).hexdigest() == found.md5 else None
        if found.md5_of_parts:
            count = int(found.md5_of_parts.rsplit("-", 1)[1])
            if count != max(1, -(-f.size // part_size)):
                return None
            upload = _Upload(f, "", part_size)
            digests = [md5_of(f.source, *upload.span(n)).digest() for n in range(1, count + 1)]
            return found.md5_of_parts if _etag_of_parts(digests) == found.md5_of_parts else None
        return None

    def _upload_all(self, files: list[LocalFile], part_size: int) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        uploads = [_Upload(f, self.prefix + f.path, part_size) for f in files if f.size > part_size]
        small = [f for f in files if f.size <= part_size]
        with ThreadPoolExecutor(self.tuning.concurrency, thread_name_prefix="upload") as pool:
            # Starting (or finding) the multipart uploads is quick; their parts then share the workers with
            # the small files. Tasks are submitted as the workers take them, so memory stays flat.
            tasks: list[Callable[[], None]] = []
            for upload in uploads:
                self._start(upload)
                for number in range(1, upload.count + 1):
                    if number not in upload.etags:
                        tasks.append(lambda u=upload, n=number: self._send_part(u, n))
            for f in small:
                tasks.append(lambda f=f: results.__setitem__(f.path, self._put(f)))
            self._run(pool, tasks)
            # In parallel: on stores that give a multipart object its plain MD5, checking it reads the file.
            for upload, entry in zip(uploads, pool.map(self._complete, uploads), strict=True):
                results[upload.file.path] = entry
        return results

    def _run(self, pool: ThreadPoolExecutor, tasks: list[Callable[[], None]]) -> None:
        """Run `tasks` with at most 2 per worker queued; the first failure stops the others."""
        pending: set[Future[None]] = set()
        try:
            for task in tasks:
                if len(pending) >= 2 * self.tuning.concurrency:  # room for one more as soon as one ends
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for d in done:
                        d.result()
                pending.add(pool.submit(self._guarded, task))
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for d in done:
                d.result()
        except BaseException:
            self._cancel.set()
            for p in pending:
                p.cancel()
            self.source.abort()
            raise

    def _guarded(self, task: Callable[[], None]) -> None:
        if not self._cancel.is_set():
            task()

    def _put(self, f: LocalFile) -> dict[str, Any]:
        digest = md5_of(f.source).digest()
        what = f"uploading {self.location(f.path)}"

        def put() -> Any:
            with FileSlice(f.source, 0, f.size) as body:
                return self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.prefix + f.path,
                    Body=body,
                    ContentMD5=base64.b64encode(digest).decode(),
                )

        etag = _etag(self._call(put, what))
        if _is_md5(etag) and etag != digest.hex():
            raise InitializerError(f"{what}: the store answered ETag {etag!r}, not the file's MD5; rerun")
        assert self.progress is not None
        self.progress.add_bytes(f.size)
        self.progress.file_done()
        return {"path": f.path, "size": f.size, "etag": digest.hex()}

    # -- multipart ------------------------------------------------------------------------------------------
    def _start(self, upload: _Upload) -> None:
        """Continue this key's newest unfinished multipart upload (keeping its parts that match the file),
        or start one."""
        what = f"s3://{self.bucket}/{upload.key}"
        found = self._unfinished(upload.key)
        if found:
            upload.upload_id = found
            kept = 0
            for number, (size, etag) in self._parts(upload).items():
                if 1 <= number <= upload.count and size == upload.span(number)[1]:
                    digest = md5_of(upload.file.source, *upload.span(number)).digest()
                    if etag == digest.hex():
                        upload.etags[number], upload.md5s[number] = etag, digest
                        kept += size
            if kept:
                done = f"{human_bytes(kept)} of {human_bytes(upload.file.size)}"
                log(f"resuming the unfinished upload of {what}: {done} already uploaded")
                assert self.progress is not None
                self.progress.total_bytes -= kept
            return
        answer = self._call(
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=upload.key),
            f"starting the upload of {what}",
        )
        upload.upload_id = answer["UploadId"]

    def _unfinished(self, key: str) -> str | None:
        """The id of the newest unfinished multipart upload of exactly `key`, if the store lists any."""
        answer = self._call(
            lambda: self._list_uploads(key), f"listing unfinished uploads of s3://{self.bucket}/{key}"
        )
        uploads = [u for u in answer.get("Uploads", []) if u.get("Key") == key and u.get("UploadId")]
        uploads.sort(key=lambda u: str(u.get("Initiated", "")))
        return uploads[-1]["UploadId"] if uploads else None

    def _list_uploads(self, key: str) -> dict[str, Any]:
        try:
            return self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":  # rclone's "none at all"
                return {}
            raise

    def _parts(self, upload: _Upload) -> dict[int, tuple[int, str]]:
        parts: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            answer = self._call(
                lambda m=marker: self.client.list_parts(
                    Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id, PartNumberMarker=m
                ),
                f"listing the uploaded parts of s3://{self.bucket}/{upload.key}",
            )
            for p in answer.get("Parts", []):
                parts[int(p["PartNumber"])] = (int(p["Size"]), _etag(p))
            if not answer.get("IsTruncated") or not answer.get("NextPartNumberMarker"):
                return parts
            marker = int(answer["NextPartNumberMarker"])

    def _send_part(self, upload: _Upload, number: int) -> None:
        start, length = upload.span(number)
        digest = md5_of(upload.file.source, start, length).digest()
        what = f"uploading part {number}/{upload.count} of s3://{self.bucket}/{upload.key}"

        def send() -> Any:
            with FileSlice(upload.file.source, start, length) as body:
                return self.client.upload_part(
                    Bucket=self.bucket,
                    Key=upload.key,
                    UploadId=upload.upload_id,
                    PartNumber=number,
                    Body=body,
                    ContentMD5=base64.b64encode(digest).decode(),
                )

        etag = _etag(self._call(send, what))
        if _is_md5(etag) and etag != digest.hex():
            raise InitializerError(f"{what}: the store answered ETag {etag!r}, not the part's MD5; rerun")
        with upload.lock:
            upload.etags[number], upload.md5s[number] = digest.hex(), digest
        assert self.progress is not None
        self.progress.add_bytes(length)

    def _complete(self, upload: _Upload) -> dict[str, Any]:
        what = f"s3://{self.bucket}/{upload.key}"
        parts = [{"PartNumber": n, "ETag": f'"{upload.etags[n]}"'} for n in range(1, upload.count + 1)]
        answer = self._call(
            lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": parts},
            ),
            f"completing the upload of {what}",
        )
        expected = _etag_of_parts([upload.md5s[n] for n in range(1, upload.count + 1)])
        etag = _etag(answer)
        # Stores such as rclone serve s3 give the whole object's plain MD5 instead of S3's multipart form.
        if etag != expected and not (_is_md5(etag) and etag == md5_of(upload.file.source).hexdigest()):
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=upload.key)
            raise InitializerError(
                f"{what}: the completed object's ETag {etag!r} is not {expected!r} (the MD5 of its parts' "
                "MD5s): the store assembled something else; it was deleted, rerun"
            )
        self._abort_others(upload)
        assert self.progress is not None
        self.progress.file_done()
        return {"path": upload.file.path, "size": upload.file.size, "etag": etag}

    def _abort_others(self, upload: _Upload) -> None:
        """Older unfinished uploads of the key (from runs stopped before they could continue one) hold
        storage that is billed: abort them."""
        with contextlib.suppress(Exception):
            answer = self._list_uploads(upload.key)
            for u in answer.get("Uploads", []):
                if u.get("Key") == upload.key and u.get("UploadId") != upload.upload_id:
                    stale = u["UploadId"]
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload.key, UploadId=stale)

    def close(self) -> None:
        self.source.close()


def md5_of_bytes(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _etag_of_parts(digests: list[bytes]) -> str:
    return f"{md5_of_bytes(b''.join(digests)).hex()}-{len(digests)}"


def _etag(answer: dict[str, Any]) -> str:
    return str(answer.get("ETag") or "").strip('"')


def _is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
