"""S3 destination: parallel uploads with bounded memory, verified, resumable, a manifest last.

- Credentials, region, endpoint, STS role, redaction, the HTTP pool and the SigV4 signer are the
  initializers' (`S3Source`): one S3 setup for both directions. Object bodies (PutObject, UploadPart) go
  through that pool, signed by that signer; on a plain connection they leave the page cache with sendfile,
  never copied through Python. The multipart calls (create, list, complete, abort) and the manifest go
  through botocore.
- Every file at or under the part size is one PutObject; a larger one is a multipart upload whose parts go
  to the worker threads with every other file's. Memory does not grow with the part size or the workers.
- A body is read once before it is sent, for every checksum it needs at once: its CRC32
  (x-amz-checksum-crc32), its SHA-256 when SigV4 signs it (plain HTTP; over TLS the body is left out of
  the signature, as botocore does), and its MD5 when the store does not verify checksums itself.
- Which check guards the bytes is decided per export by a probe, a tiny object sent with a wrong CRC32
  (`_probe`): a store that refuses it (AWS S3, MinIO, ...) verifies every request's CRC32 and refuses a
  body that does not match, and a multipart object's composite CRC32 is compared with ours at completion.
  A store that takes it (moto, rclone serve s3, ...) checks nothing: then each answer's ETag, the MD5 of
  what the store received, is compared with the MD5 of what was sent (a mismatch is sent again), and a
  completed object's ETag with the MD5 of its parts' MD5s (or, on stores that give a multipart object its
  plain MD5, with that); an ETag there that is no MD5 (an encrypted object) cannot be checked, and the
  export is refused. A store that refuses the header whatever its value gets none, and the MD5 check.
- A damaged part is sent again under its number, which replaces it (S3's rule). A store that cannot replace
  a part it has taken (rclone serve s3: parts are streamed on in order, and part numbers must have no gaps,
  so no spare number can take the retry either) gets the file's upload started over in a new multipart
  upload; the old one is aborted once the file is complete.
- Resume: objects already at the destination with the same size and MD5 (single or multipart form) are
  skipped; for a large file, an unfinished multipart upload of its key (ListMultipartUploads) is continued:
  the parts it holds whose size and checksum (ETag or CRC32) match the file's are kept, the others sent
  again.
- The manifest (`.model-exporter/manifest.json` under the prefix: every file with its size and ETag, and
  the run's summary) is removed before anything is written and put back last, so a reader that waits for
  it never takes a half-export for a complete one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import botocore.exceptions

from pkg.initializers.blocks import blocks, md5_of
from pkg.initializers.errors import InitializerError, TransientError, parse_retry_after, tls_answer
from pkg.initializers.progress import Progress, human_bytes, log
from pkg.initializers.sources.base import RemoteFile
from pkg.initializers.sources.http import TRANSIENT_CODES, USER_AGENT, FileRange, error_code, open_reply
from pkg.initializers.sources.s3 import S3Source
from pkg.initializers.sources.sigv4 import UNSIGNED_PAYLOAD
from pkg.initializers.transfer import retry
from pkg.initializers.uri import S3Uri

from .config import ExportConfig
from .outputs import LocalFile, Selection

T = TypeVar("T")
MANIFEST = ".model-exporter/manifest.json"
PROBE = ".model-exporter/checksum-probe"
MAX_PARTS = 10_000  # S3's limit per multipart upload
# Half the downloads' 16 MiB, as aws-cli: a part is sent once its checksums are known, and smaller parts
# keep more of them in flight (bench/bench_exporter.py: 16 MiB parts were 0.55-0.75x `aws s3 sync`).
UPLOAD_PART_SIZE = 8 * 1024 * 1024
_WRITE_DENIED = {"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# What stores answer a body whose checksum (CRC32, Content-MD5, SigV4 SHA-256) does not match it.
_MISMATCH = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
# What a store may answer a request header it does not support (the probe's x-amz-checksum-crc32).
_UNSUPPORTED = {"InvalidRequest", "InvalidArgument", "NotImplemented"}


class _Irreplaceable(InitializerError):
    """The store keeps a damaged copy of a part and refuses to take the part again."""


@dataclass(frozen=True)
class Digests:
    """The checksums of one body, from one read of it."""

    crc32: int
    md5: bytes | None  # when the store does not verify checksums
    sha256: str | None  # hex, when SigV4 signs the body (plain HTTP)

    @property
    def crc32_b64(self) -> str:
        return _b64_crc(self.crc32)


def digests_of(path: Path, start: int, length: int, md5: bool, sha256: bool) -> Digests:
    """The CRC32 (and MD5, SHA-256 if asked) of `length` bytes of `path` from `start`, read once."""
    crc = 0
    md5_hash = hashlib.md5(usedforsecurity=False) if md5 else None
    sha_hash = hashlib.sha256() if sha256 else None
    for block in blocks(path, start, length):
        crc = zlib.crc32(block, crc)
        if md5_hash:
            md5_hash.update(block)
        if sha_hash:
            sha_hash.update(block)
    return Digests(crc, md5_hash.digest() if md5_hash else None, sha_hash.hexdigest() if sha_hash else None)


@dataclass
class _Upload:
    """One file's multipart upload: its id, and each part's ETag and checksums once it is on the server."""

    file: LocalFile
    key: str
    part_size: int
    upload_id: str = ""
    etags: dict[int, str] = field(default_factory=dict)
    digests: dict[int, Digests] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    restarts: int = 0  # new multipart uploads after a part the store could not take again

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
        # botocore sends no object bodies here (the manifest carries its Content-MD5): its default CRC32 of
        # every request body would be a hash for nothing.
        os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
        self.source = S3Source(uri, config.shared)  # credentials, region, endpoint, signing, pool, errors
        prefix = uri.prefix
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.bucket = uri.bucket
        self.progress: Progress | None = None
        self._cancel = threading.Event()
        # What `_probe` finds the store checks, and so what each body carries:
        self.crc_header = True  # x-amz-checksum-crc32 (unless the store refuses it)
        self.store_verifies = False  # the store refuses a body whose CRC32 does not match (else: MD5s)
        self.sign_payload = True  # its SHA-256 in the signature (plain HTTP, where the store checks it)

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
        if todo:
            self._probe()
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

    def _probe(self) -> None:
        """Find out once what the store checks, with a tiny object sent with one wrong value at a time:
        - a wrong x-amz-checksum-crc32 is refused by a store that verifies it (then that is the check of
          every body) and taken by one that does not (then our MD5s check the ETags it answers); a store
          that refuses even the right one gets none;
        - over plain HTTP, a wrong signed SHA-256 of the body is refused by a store that verifies it (then
          every body is signed, as botocore does, against tampering on the way) and taken by one that does
          not: hashing every body for a signature nobody checks would cost more than the upload itself, so
          bodies go unsigned there (if the store takes UNSIGNED-PAYLOAD), the MD5 check still in place."""
        key, data = self.prefix + PROBE, b"checksum probe\n"
        url, what = self._url(key), f"writing {self.location(PROBE)}"
        plain = url.startswith("http:")
        crc, sha = zlib.crc32(data), hashlib.sha256(data).hexdigest()

        def taken(crc32: int | None, payload: str) -> bool:
            headers = {"Content-Length": str(len(data))}
            if crc32 is not None:
                headers["x-amz-checksum-crc32"] = _b64_crc(crc32)
            status, answer, headers = self._put_once(url, headers, payload, data, what)
            code = error_code(answer)
            if status < 300:
                return True
            if code in _MISMATCH or code in _UNSUPPORTED or status == 501 or (status == 400 and not code):
                return False
            if payload != sha and code == "SignatureDoesNotMatch":  # a store that hashes the body to check it
                return False
            raise self._refused(status, code, answer, url, what, headers.get("Retry-After"))

        def ask(crc32: int | None, payload: str) -> bool:
            return self._call(lambda: taken(crc32, payload), what)

        payload = sha if plain else UNSIGNED_PAYLOAD
        ignored = ask(crc ^ 0xFFFFFFFF, payload)
        self.store_verifies = not ignored and ask(crc, payload)
        self.crc_header = ignored or self.store_verifies
        header = crc if self.crc_header else None
        self.sign_payload = plain and not (ask(header, "0" * 64) and ask(header, UNSIGNED_PAYLOAD))
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=key), f"removing {key}")
        if self.store_verifies:
            checks = "it verifies x-amz-checksum-crc32: every body carries its CRC32"
        else:
            checks = (
                "it verifies no checksum: every ETag it answers is checked against the MD5 of what was sent"
            )
        if plain:
            signed = "signed" if self.sign_payload else "unsigned (the store does not check their signature)"
            checks += f"; bodies over plain HTTP go {signed}"
        log(f"S3 at {self.source._where()}: {checks}")

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
            # the small files, one file's parts after the other's, and the worker that sends a file's last
            # part completes it: the store assembles one object while the next one's parts arrive (and on
            # stores that give a multipart object its plain MD5, the check reads the file meanwhile). Tasks
            # are submitted as the workers take them, so memory stays flat.
            tasks: list[Callable[[], None]] = []
            for upload in uploads:
                self._start(upload)
                missing = [n for n in range(1, upload.count + 1) if n not in upload.etags]
                for number in missing:
                    tasks.append(lambda u=upload, n=number: self._send_part(u, n, results))
                if not missing:
                    tasks.append(lambda u=upload: results.__setitem__(u.file.path, self._complete(u)))
            for f in small:
                tasks.append(lambda f=f: results.__setitem__(f.path, self._put(f)))
            self._run(pool, tasks)
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
        etag, _ = self._send(self.prefix + f.path, f.source, 0, f.size)
        assert self.progress is not None
        self.progress.add_bytes(f.size)
        self.progress.file_done()
        return {"path": f.path, "size": f.size, "etag": etag}

    def _url(self, key: str) -> str:
        return f"{self.source.base_url}/{quote(key, safe='/~')}"

    def _put_once(
        self, url: str, headers: dict[str, str], payload: str, body: FileRange | bytes, what: str
    ) -> tuple[int, bytes, Any]:
        """One signed PUT (`payload`: the body's SHA-256, or UNSIGNED_PAYLOAD): the status, the start of the
        answer's body and its headers. 429 and 5xx raise TransientError."""
        sent = {**self.source.sign(url, headers, "PUT", payload), "User-Agent": USER_AGENT}
        reply = open_reply(self.source.http, url, sent, what, put=body)
        complete = False
        try:
            answer = reply.read(64 * 1024)
            complete = True
        finally:
            reply.finish(complete)
        return reply.status, answer, reply.headers

    def _send(
        self,
        key: str,
        path: Path,
        start: int,
        length: int,
        upload: _Upload | None = None,
        part: int = 0,
        upload_id: str = "",
    ) -> tuple[str, Digests]:
        """PUT bytes [start, start + length) of `path` at `key`, as an object or as `part` of `upload` (in
        its multipart upload `upload_id`), checked as `_probe` decided; returns the answer's ETag and the
        body's checksums."""
        url = self._url(key)
        what = f"uploading {self.location(key.removeprefix(self.prefix))}"
        if upload:
            url += f"?partNumber={part}&uploadId={quote(upload_id, safe='-_.~')}"
            what += f" part {part}/{upload.count}"
        digests = digests_of(path, start, length, md5=not self.store_verifies, sha256=self.sign_payload)
        headers = {"Content-Length": str(length)}
        if self.crc_header:
            headers["x-amz-checksum-crc32"] = digests.crc32_b64

        damaged = False  # the store holds a damaged copy, which some stores (rclone) cannot replace

        def once() -> str:
            nonlocal damaged
            with FileRange(path, start, length) as body:
                status, answer, got = self._put_once(
                    url, headers, digests.sha256 or UNSIGNED_PAYLOAD, body, what
                )
            if status == 501 and damaged and upload:
                raise _Irreplaceable(f"{what}: the store cannot take the damaged part again (HTTP 501)")
            if status >= 300:
                raise self._refused(status, error_code(answer), answer, url, what, got.get("Retry-After"))
            etag, echoed = str(got.get("ETag") or "").strip('"'), got.get("x-amz-checksum-crc32")
            if self.crc_header and echoed and echoed != digests.crc32_b64:
                raise TransientError(
                    f"{what}: the store answered CRC32 {echoed}, not the body's; sending again"
                )
            if not self.store_verifies:
                if not _is_md5(etag):
                    raise InitializerError(
                        f"{what}: the store verifies no checksum and its ETag {etag[:40]!r} is not an MD5 "
                        "(an encrypted bucket?): the upload cannot be verified; use a store that checks "
                        "x-amz-checksum-crc32 (AWS S3 does) or unencrypted objects"
                    )
                if digests.md5 is not None and etag != digests.md5.hex():
                    damaged = True
                    raise TransientError(
                        f"{what}: the store received something else (ETag {etag}); sending again"
                    )
            return etag

        return self._call(once, what), digests

    def _refused(
        self, status: int, code: str, answer: bytes, url: str, what: str, retry_after: str | None = None
    ) -> Exception:
        """The error for an error answer to a PUT: retried when it may pass (a body damaged on the way, 429,
        5xx, throttling), else one line saying what to fix."""
        if wrong := tls_answer(status, answer, url):
            return wrong
        if code in TRANSIENT_CODES or code in _MISMATCH or status == 429 or (status >= 500 and status != 501):
            return TransientError(f"{what}: {code or 'HTTP'} (HTTP {status})", parse_retry_after(retry_after))
        if code in _WRITE_DENIED or status in (401, 403):
            return InitializerError(
                f"S3 denied {what} ({code or status}): check ACCESS_KEY_ID / SECRET_ACCESS_KEY / ROLE_ARN "
                f"and that the credentials may write to {self.location()}"
            )
        return self.source._client_error(code or str(status), status, what, f"HTTP {status}")

    # -- multipart ------------------------------------------------------------------------------------------
    def _start(self, upload: _Upload) -> None:
        """Continue this key's newest unfinished multipart upload (keeping its parts that match the file),
        or start one."""
        what = f"s3://{self.bucket}/{upload.key}"
        found = self._unfinished(upload.key)
        if found:
            upload.upload_id = found
            kept = 0
            for number, (size, etag, crc) in self._parts(upload).items():
                digests = None
                if 1 <= number <= upload.count and size == upload.span(number)[1]:
                    digests = digests_of(upload.file.source, *upload.span(number), md5=True, sha256=False)
                if not digests or not (
                    (digests.md5 and etag == digests.md5.hex()) or crc == digests.crc32_b64
                ):
                    # A part that is not the file's (damaged, or another file's): some stores (rclone) cannot
                    # take a part again, so this upload is left (and aborted once a new one completes).
                    log(f"not resuming the unfinished upload of {what}: its part {number} is not the file's")
                    upload.etags.clear()
                    upload.digests.clear()
                    found, kept = None, 0
                    break
                upload.etags[number], upload.digests[number] = etag, digests
                kept += size
        if found:
            if kept:
                done = f"{human_bytes(kept)} of {human_bytes(upload.file.size)}"
                log(f"resuming the unfinished upload of {what}: {done} already uploaded")
                assert self.progress is not None
                self.progress.total_bytes -= kept
            return
        upload.upload_id = self._create(upload)

    def _create(self, upload: _Upload) -> str:
        """A new multipart upload of the file's key: its id."""
        answer = self._call(
            lambda: self.client.create_multipart_upload(
                Bucket=self.bucket, Key=upload.key, **self._algorithm
            ),
            f"starting the upload of s3://{self.bucket}/{upload.key}",
        )
        return answer["UploadId"]

    def _unfinished(self, key: str) -> str | None:
        """The id of the newest unfinished multipart upload of exactly `key`, if the store lists any."""
        answer = self._call(
            lambda: self._list_uploads(key), f"listing unfinished uploads of s3://{self.bucket}/{key}"
        )
        uploads = [u for u in answer.get("Uploads", []) if u.get("Key") == key and u.get("UploadId")]
        # One started with another checksum setting cannot take these parts (stores that list none: any).
        algorithm = self._algorithm.get("ChecksumAlgorithm")
        uploads = [u for u in uploads if u.get("ChecksumAlgorithm", algorithm) == algorithm]
        uploads.sort(key=lambda u: str(u.get("Initiated", "")))
        return uploads[-1]["UploadId"] if uploads else None

    def _list_uploads(self, key: str) -> dict[str, Any]:
        try:
            return self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":  # rclone's "none at all"
                return {}
            raise

    @property
    def _algorithm(self) -> dict[str, str]:
        """A multipart upload's checksum setting: the parts' CRC32s, which S3 then combines at completion."""
        return {"ChecksumAlgorithm": "CRC32"} if self.crc_header else {}

    def _parts(self, upload: _Upload) -> dict[int, tuple[int, str, str | None]]:
        """Each uploaded part's size, ETag and CRC32 (when the store lists one)."""
        parts: dict[int, tuple[int, str, str | None]] = {}
        marker = 0
        while True:
            answer = self._call(
                lambda m=marker: self.client.list_parts(
                    Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id, PartNumberMarker=m
                ),
                f"listing the uploaded parts of s3://{self.bucket}/{upload.key}",
            )
            for p in answer.get("Parts", []):
                parts[int(p["PartNumber"])] = (int(p["Size"]), _etag(p), p.get("ChecksumCRC32"))
            if not answer.get("IsTruncated") or not answer.get("NextPartNumberMarker"):
                return parts
            marker = int(answer["NextPartNumberMarker"])

    def _send_part(self, upload: _Upload, number: int, results: dict[str, dict[str, Any]]) -> None:
        """Send one part (and, when the upload starts over, the parts it held); the last one to land
        completes the upload."""
        assert self.progress is not None
        todo = [number]
        while todo:
            number = todo.pop(0)
            start, length = upload.span(number)
            upload_id = upload.upload_id
            try:
                etag, digests = self._send(
                    upload.key, upload.file.source, start, length, upload, number, upload_id
                )
            except _Irreplaceable:
                todo = [*self._restart(upload, upload_id), number, *todo]
                continue
            with upload.lock:
                current = upload.upload_id == upload_id
                if current:
                    upload.etags[number], upload.digests[number] = etag, digests
                    last = len(upload.etags) == upload.count
            if not current:  # sent to the upload that was left: into the new one, again
                todo.insert(0, number)
                continue
            self.progress.add_bytes(length)
            if last:
                results[upload.file.path] = self._complete(upload)

    def _restart(self, upload: _Upload, refused_id: str) -> list[int]:
        """Start the file's upload over, the store holding a damaged part of `refused_id` that it cannot
        replace (unless another worker did already). Returns the parts sent so far, which the caller sends
        again; the ones in flight send themselves again (`_send_part`)."""
        with upload.lock:  # the other workers of this file wait for the new id
            if upload.upload_id != refused_id:
                return []
            if upload.restarts >= self.tuning.max_attempts:
                raise InitializerError(
                    f"s3://{self.bucket}/{upload.key}: the store received damaged parts and cannot take them "
                    f"again, {upload.restarts + 1} uploads in a row; check the network on the way, then rerun"
                )
            upload.restarts += 1
            upload.upload_id = self._create(upload)
            sent = sorted(upload.etags)
            upload.etags.clear()
            upload.digests.clear()
        assert self.progress is not None
        self.progress.total_bytes += sum(upload.span(n)[1] for n in sent)  # their bytes go again
        log(
            f"s3://{self.bucket}/{upload.key}: the store cannot take a damaged part again: the file's upload "
            f"starts over ({len(sent)} parts sent again)"
        )
        return sent

    def _complete(self, upload: _Upload) -> dict[str, Any]:
        what = f"s3://{self.bucket}/{upload.key}"
        numbers = range(1, upload.count + 1)
        parts = [{"PartNumber": n, "ETag": f'"{upload.etags[n]}"'} for n in numbers]
        if self.crc_header:
            for part in parts:
                part["ChecksumCRC32"] = upload.digests[int(part["PartNumber"])].crc32_b64
        answer = self._call(
            lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=upload.key,
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": parts},
            ),
            f"completing the upload of {what}",
        )
        etag = _etag(answer)
        if (
            self.store_verifies
        ):  # each part was checked; the store's CRC32 of their CRC32s says it has them all
            crcs = b"".join(upload.digests[n].crc32.to_bytes(4, "big") for n in numbers)
            expected = f"{_b64_crc(zlib.crc32(crcs))}-{upload.count}"
            got = answer.get("ChecksumCRC32") or expected  # "<base64>-N", or without "-N" on some stores
            wrong = got.split("-")[0] != expected.split("-")[0]
            what_of = "the CRC32 of its parts' CRC32s"
        else:
            expected = _etag_of_parts([upload.digests[n].md5 or b"" for n in numbers])
            got = etag
            # Stores such as rclone serve s3 give the whole object's plain MD5 instead of S3's multipart form.
            wrong = etag != expected and not (
                _is_md5(etag) and etag == md5_of(upload.file.source).hexdigest()
            )
            what_of = "the MD5 of its parts' MD5s"
        if wrong:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=upload.key)
            raise InitializerError(
                f"{what}: the completed object's checksum {got!r} is not {expected!r} ({what_of}): the store "
                "assembled something else; it was deleted, rerun"
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


def _b64_crc(crc: int) -> str:
    """A CRC32 as S3 writes it: the 4 bytes, big-endian, in base64."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _etag_of_parts(digests: list[bytes]) -> str:
    return f"{md5_of_bytes(b''.join(digests)).hex()}-{len(digests)}"


def _etag(answer: dict[str, Any]) -> str:
    return str(answer.get("ETag") or "").strip('"')


def _is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)
