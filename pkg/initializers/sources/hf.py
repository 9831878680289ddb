"""Hugging Face Hub source (and mirrors through HF_ENDPOINT).

Listing goes through huggingface_hub's HfApi: the revision is resolved to a commit once, so every file
comes from the same snapshot, and the tree gives sizes, LFS SHA-256s and git blob ids for verification.
Bytes come through our engine from the `resolve` URL with the token in an Authorization header (urllib3
drops it on redirects to another host, e.g. a CDN). The token is never written to disk or printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from ..config import Config
from ..errors import InitializerError, TransientError, one_line, parse_retry_after, untrusted_certificate
from ..uri import HfUri
from .base import RemoteFile, Source
from .http import Pool, get_range


class HfSource(Source):
    def __init__(self, uri: HfUri, config: Config):
        self.uri = uri
        self.config = config
        self.repo_type = "dataset" if config.kind == "dataset" else "model"
        self.token = config.access_token
        self.api = HfApi(
            endpoint=config.hf_endpoint, token=self.token or False, library_name="kubeflow-trainer"
        )
        self.commit: str | None = None
        self.http = Pool(config.tuning.concurrency, config.tuning.read_timeout)

    def resolved(self) -> dict[str, str]:
        return {"commit": self.commit or "", "repo_type": self.repo_type}

    # -- listing --------------------------------------------------------------------------------------------
    def list_files(self) -> list[RemoteFile]:
        from ..transfer import retry

        info = retry(
            lambda: self._call(
                lambda: self.api.repo_info(
                    self.uri.repo_id, repo_type=self.repo_type, revision=self.uri.revision
                )
            ),
            f"reading {self.uri}",
            self.config.tuning,
        )
        self.commit = info.sha
        entries = retry(
            lambda: self._call(
                lambda: list(
                    self.api.list_repo_tree(
                        self.uri.repo_id,
                        path_in_repo=self.uri.subpath or None,
                        recursive=True,
                        revision=self.commit,
                        repo_type=self.repo_type,
                    )
                )
            ),
            f"listing {self.uri}",
            self.config.tuning,
        )
        files = []
        for e in entries:
            if not isinstance(e, RepoFile):
                continue
            sha256 = e.lfs.sha256 if e.lfs else None
            files.append(
                RemoteFile(
                    path=e.path,  # repo-relative, so dataset configs that name paths keep working
                    size=e.size,
                    key=e.path,
                    version=sha256 or e.blob_id,
                    sha256=sha256,
                    git_sha1=None if e.lfs else e.blob_id,
                )
            )
        return files

    def _call(self, fn: Any) -> Any:
        """Run an HfApi call, mapping its errors to TransientError or a one-line InitializerError."""
        kind = self.repo_type
        try:
            return fn()
        except GatedRepoError:
            raise InitializerError(
                f"{self.uri} is a gated {kind} repo: accept its terms on the Hub with your account and set "
                "ACCESS_TOKEN to a token of that account"
            ) from None
        except RevisionNotFoundError:
            raise InitializerError(
                f"revision {self.uri.revision!r} not found in {kind} repo {self.uri.repo_id}"
            ) from None
        except (EntryNotFoundError, RemoteEntryNotFoundError):
            raise InitializerError(
                f"path {self.uri.subpath!r} not found in {kind} repo {self.uri.repo_id}"
            ) from None
        except RepositoryNotFoundError:
            hint = (
                "check the name, and that ACCESS_TOKEN may read it"
                if self.token
                else "check the name; if it is private or gated, set ACCESS_TOKEN"
            )
            raise InitializerError(
                f"{kind} repo {self.uri.repo_id} not found at {self.config.hf_endpoint}: {hint}"
            ) from None
        except DisabledRepoError:
            raise InitializerError(f"{kind} repo {self.uri.repo_id} is disabled on the Hub") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
                raise TransientError(f"HTTP {status} from {self.config.hf_endpoint}", retry_after) from None
            if status in (401, 403):
                raise InitializerError(
                    f"the Hub refused ACCESS_TOKEN for {self.uri.repo_id} (HTTP {status}): set a valid token "
                    "with read access"
                ) from None
            raise InitializerError(f"Hub error for {self.uri}: {one_line(exc, 200)}") from None
        except httpx2.TransportError as exc:
            raise untrusted_certificate(exc, self.config.hf_endpoint) or TransientError(
                f"{type(exc).__name__}: {one_line(exc, 200)}"
            ) from None

    # -- reading --------------------------------------------------------------------------------------------
    def url(self, file: RemoteFile) -> str:
        return hf_hub_url(
            self.uri.repo_id,
            file.key,
            repo_type=self.repo_type,
            revision=self.commit,
            endpoint=self.config.hf_endpoint,
        )

    def open_range(self, file: RemoteFile, start: int, end: int) -> AbstractContextManager[Iterator[bytes]]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return get_range(self.http, self.url(file), file.path, start, end, file.size, headers, self._fatal)

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
        self.api = None  # type: ignore[assignment]
