"""Hugging Face Hub source (and mirrors through HF_ENDPOINT).

Listing speaks the Hub's API itself (`api.py`), with the same deadlines, caps and one retry layer as
everything else: the revision is resolved to a commit once, so every file comes from the same snapshot, and
the tree gives sizes, LFS SHA-256s and git blob ids for verification. Tree pages are followed through their
`Link: <...>; rel="next"` header only on the endpoint's own host (the token goes nowhere else) and never
back to a page already read. Bytes come through our engine from the `resolve` URL with the token in an
Authorization header (dropped on redirects to another host, e.g. a CDN). The token is never written to
disk or printed.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from ..config import Config
from ..errors import InitializerError, TransientError, one_line
from ..listing import Listing
from ..retry import retry
from ..uri import HfUri
from .api import Answer, get_json
from .base import RemoteFile, Source
from .http import Pool, get_range, same_origin_key

_SHA1 = re.compile(r"^[0-9a-f]{40}$")  # a git commit id, or a git blob id
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)


class HfSource(Source):
    def __init__(self, uri: HfUri, config: Config):
        self.uri = uri
        self.config = config
        self.repo_type = "dataset" if config.kind == "dataset" else "model"
        self.token = config.access_token
        self.auth: dict[str, str] = {}
        if self.token:
            self.auth["Authorization"] = f"Bearer {self.token}"
        elif config.hf_login:  # HF_ENDPOINT=https://user:password@mirror: Basic auth, as HTTP clients do
            login = base64.b64encode(":".join(config.hf_login).encode()).decode()
            self.auth["Authorization"] = f"Basic {login}"
        self.where = f"the Hub at {config.hf_endpoint}"
        self.commit: str | None = None
        self.http = Pool(config.tuning.concurrency, config.tuning.read_timeout)

    def resolved(self) -> dict[str, str]:
        return {"commit": self.commit or "", "repo_type": self.repo_type}

    # -- listing --------------------------------------------------------------------------------------------
    def list_files(self) -> list[RemoteFile]:
        tuning = self.config.tuning
        sub = self.uri.subpath
        listing = Listing(self.where, tuning, prefix=f"{sub}/" if sub else "")
        api = f"{self.config.hf_endpoint}/api/{self.repo_type}s/{self.uri.repo_id}"
        rev = self.uri.revision
        # expand=sha: only the commit, not the list of every file (tens of MB for a repo of a million files).
        info_url = (f"{api}/revision/{quote(rev, safe='')}" if rev else api) + "?expand=sha"
        listing.page()
        info = retry(lambda: self._get(info_url, listing), f"reading {self.uri}", tuning)
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not _SHA1.match(commit):
            raise listing.malformed(f"repo info without a commit id: {one_line(str(commit)[:60])!r}")
        self.commit = commit
        url: str | None = f"{api}/tree/{commit}" + (f"/{quote(sub)}" if sub else "") + "?recursive=true"
        read: set[str] = set()
        while url:
            listing.page()
            read.add(url)
            answer = retry(lambda u=url: self._get(u, listing, answer=True), f"listing {self.uri}", tuning)
            if not isinstance(answer.data, list):
                raise listing.malformed(f"the tree is a JSON {type(answer.data).__name__}, not a list")
            for entry in answer.data:
                self._add(listing, entry)
            url = self._next(answer, url, read, listing)
        return listing.files()

    def _add(self, listing: Listing, entry: Any) -> None:
        """One tree entry: folders are skipped, files checked for the fields verification needs."""
        if not isinstance(entry, dict):
            raise listing.malformed(f"a tree entry that is not an object: {one_line(str(entry)[:60])!r}")
        kind = entry.get("type")
        if kind == "directory":
            return
        path = entry.get("path")
        if kind != "file":
            raise listing.malformed(f"an entry of unknown type {one_line(str(kind)[:30])!r}")
        lfs = entry.get("lfs")
        oid = entry.get("oid")
        if lfs is not None:
            sha256 = lfs.get("oid") if isinstance(lfs, dict) else None
            if not isinstance(sha256, str) or not _SHA256.match(sha256):
                raise listing.malformed(f"an LFS entry {one_line(str(path)[:200])!r} without a SHA-256")
            listing.add(path, entry.get("size"), sha256, path=path, sha256=sha256)
        elif isinstance(oid, str) and _SHA1.match(oid):
            listing.add(path, entry.get("size"), oid, path=path, git_sha1=oid)
        else:
            raise listing.malformed(f"a file entry {one_line(str(path)[:200])!r} without a git blob id")

    def _next(self, answer: Answer, url: str, read: set[str], listing: Listing) -> str | None:
        """The next page of the tree from the Link header: only on this host, never one already read."""
        link = _NEXT.search(answer.headers.get("Link") or "")
        if not link:
            return None
        target = urljoin(url, link.group(1))
        if same_origin_key(target) != same_origin_key(self.config.hf_endpoint):
            raise listing.malformed(
                f"its next page is on another host ({one_line(target.split('?')[0], 120)}); refusing to "
                "follow it, which would send ACCESS_TOKEN there"
            )
        if target in read:
            raise listing.malformed("its next page is one already read, so it would page forever")
        return target

    def _get(self, url: str, listing: Listing, answer: bool = False) -> Any:
        """The JSON at `url` (or its Answer), mapping the Hub's error statuses to one-line errors."""
        try:
            got = get_json(self.http, url, self.auth, self.where, listing.left())
        except TransientError:
            listing.left()  # the listing's own deadline, when that is what passed, says more
            raise
        if got.status >= 300:
            raise self._error(got)
        return got if answer else got.data

    def _error(self, got: Answer) -> InitializerError:
        """The Hub's answer for a missing, private, gated or disabled repo or revision, in one line."""
        kind = self.repo_type
        code = got.headers.get("X-Error-Code") or ""
        message = got.headers.get("X-Error-Message") or got.text
        if code == "GatedRepo":
            return InitializerError(
                f"{self.uri} is a gated {kind} repo: accept its terms on the Hub with your account and set "
                "ACCESS_TOKEN to a token of that account"
            )
        if code == "RevisionNotFound":
            return InitializerError(
                f"revision {self.uri.revision!r} not found in {kind} repo {self.uri.repo_id}"
            )
        if code == "EntryNotFound":
            return InitializerError(f"path {self.uri.subpath!r} not found in {kind} repo {self.uri.repo_id}")
        if code == "RepoNotFound" or (got.status == 404 and not code):
            hint = (
                "check the name, and that ACCESS_TOKEN may read it"
                if self.token
                else "check the name; if it is private or gated, set ACCESS_TOKEN"
            )
            return InitializerError(
                f"{kind} repo {self.uri.repo_id} not found at {self.config.hf_endpoint}: {hint}"
            )
        if got.status == 403 and "disabled" in message.lower():
            return InitializerError(f"{kind} repo {self.uri.repo_id} is disabled on the Hub")
        if got.status in (401, 403):
            return InitializerError(
                f"the Hub refused ACCESS_TOKEN for {self.uri.repo_id} (HTTP {got.status}): set a valid token "
                "with read access"
            )
        return InitializerError(
            f"Hub error for {self.uri}: HTTP {got.status} {one_line(message, 200)}".rstrip()
        )

    # -- reading --------------------------------------------------------------------------------------------
    def url(self, file: RemoteFile) -> str:
        """The `resolve` URL of `file` at the listed commit (what huggingface_hub's hf_hub_url builds)."""
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return (
            f"{self.config.hf_endpoint}/{kind}{self.uri.repo_id}/resolve/{quote(self.commit or '', safe='')}"
            f"/{quote(file.key)}"
        )

    def open_range(self, file: RemoteFile, start: int, end: int) -> AbstractContextManager[Iterator[bytes]]:
        return get_range(self.http, self.url(file), file.path, start, end, file.size, self.auth, self._fatal)

    def _fatal(self, status: int, _code: str) -> InitializerError | None:
        if status in (401, 403):
            hint = "check that ACCESS_TOKEN may read it" if self.token else "set ACCESS_TOKEN"
            return InitializerError(
                f"the Hub refused to serve a file of {self.uri.repo_id} (HTTP {status}): {hint}"
            )
        if status == 404:
            return InitializerError(f"a file disappeared from {self.uri.repo_id}@{self.commit}; rerun")
        return None

    def host(self, file: RemoteFile) -> str:
        return urlsplit(self.config.hf_endpoint).netloc

    def abort(self) -> None:
        self.http.abort()

    def close(self) -> None:
        self.http.clear()
