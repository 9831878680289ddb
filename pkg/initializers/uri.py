"""STORAGE_URI: `hf://ORG/NAME[@REVISION][/SUB/PATH]`, `s3://BUCKET[/PREFIX]`, `file:///PATH`, `/PATH`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from .errors import InitializerError

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


@dataclass(frozen=True)
class HfUri:
    repo_id: str
    revision: str | None = None  # branch, tag or commit; None means the default branch
    subpath: str = ""  # folder inside the repo, "" for the whole repo

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        sub = f"/{self.subpath}" if self.subpath else ""
        return f"hf://{self.repo_id}{rev}{sub}"


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        """Without a trailing '/': the prefix is read as a folder either way, so `s3://b/p` and `s3://b/p/`
        are one source (one completion marker)."""
        folder = self.prefix.rstrip("/")
        return f"s3://{self.bucket}/{folder}" if folder else f"s3://{self.bucket}"


@dataclass(frozen=True)
class LocalUri:
    path: str

    def __str__(self) -> str:
        return f"file://{self.path}"


StorageUri = HfUri | S3Uri | LocalUri

_HELP = "expected hf://ORG/NAME[@REVISION][/SUB/PATH], s3://BUCKET[/PREFIX], file:///PATH or an absolute path"


def parse_uri(text: str) -> StorageUri:
    """Parse a STORAGE_URI, raising InitializerError with a one-line explanation when it is unusable."""
    text = text.strip()
    if not text:
        raise InitializerError(f"STORAGE_URI is empty: {_HELP}")
    if text.startswith("/"):
        return _local(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise InitializerError(f"STORAGE_URI {text!r} has no scheme: {_HELP}")
    scheme = scheme.lower()
    if scheme == "hf":
        return _hf(text, rest)
    if scheme == "s3":
        return _s3(text, rest)
    if scheme == "file":
        if not rest.startswith("/"):
            raise InitializerError(
                f"STORAGE_URI {text!r}: file:// needs an absolute path, e.g. file:///mnt/data"
            )
        return _local(unquote(rest))
    raise InitializerError(
        f"STORAGE_URI {text!r}: unsupported scheme {scheme!r}; {_HELP} "
        "(S3-compatible stores such as GCS or MinIO: s3:// with ENDPOINT)"
    )


_HUB_REFS = ("pr", "convert")  # the Hub's own refs with a '/' inside: written as they are, not encoded


def _hf(text: str, rest: str) -> HfUri:
    parts = [p for p in rest.strip("/").split("/")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise InitializerError(f"STORAGE_URI {text!r}: missing repository, expected hf://ORG/NAME")
    org, name = parts[0], parts[1]
    name, at, revision = name.partition("@")
    if at and not revision:
        raise InitializerError(f"STORAGE_URI {text!r}: empty revision after '@'")
    for part in (org, name):
        if not _REPO_PART.match(part):
            raise InitializerError(f"STORAGE_URI {text!r}: {part!r} is not a valid repository name")
    sub = [p for p in parts[2:] if p]
    if revision == "refs" and len(sub) >= 2 and sub[0] in _HUB_REFS:  # refs/pr/N, refs/convert/parquet
        revision, sub = "/".join(["refs", *sub[:2]]), sub[2:]
    if any(p in (".", "..") for p in sub):
        raise InitializerError(f"STORAGE_URI {text!r}: '.' and '..' are not allowed in the sub-path")
    revision = unquote(revision)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in revision + "/".join(sub)) or revision in (".", ".."):
        raise InitializerError(
            f"STORAGE_URI {text!r}: the revision and sub-path may not hold control characters, '.' or '..'"
        )
    return HfUri(f"{org}/{name}", revision or None, "/".join(sub))


def _s3(text: str, rest: str) -> S3Uri:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InitializerError(f"STORAGE_URI {text!r}: missing bucket, expected s3://BUCKET[/PREFIX]")
    if not _BUCKET.match(bucket):
        raise InitializerError(f"STORAGE_URI {text!r}: {bucket!r} is not a valid bucket name")
    return S3Uri(bucket, prefix.lstrip("/"))


def _local(path: str) -> LocalUri:
    if "\x00" in path:
        raise InitializerError("STORAGE_URI contains a NUL byte")
    return LocalUri(path.rstrip("/") or "/")
