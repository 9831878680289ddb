"""Hugging Face Hub destination, through huggingface_hub's own client (pinned in requirements.txt).

The repo is created when missing (private unless HF_PUBLIC=true), the branch too; then one commit holds every
file and the model card (README.md, from the run's summary): a reader sees the whole export or none of it.
Large files go through the Hub's LFS protocol (preupload -> LFS batch -> PUT -> verify -> commit); Xet is
switched off, so one protocol is used everywhere, the test server included. Files the branch already holds
with the same content are left out of the commit (the preupload answer names their ids), and LFS objects the
Hub already has are not sent again, so a rerun after a failure sends only what is missing. Transient
failures (connection errors, 429, 5xx) retry the whole step with the initializers' policy.
"""

from __future__ import annotations

import os
from typing import Any

from pkg.initializers.errors import InitializerError, TransientError, one_line, parse_retry_after
from pkg.initializers.progress import human_bytes, log
from pkg.initializers.transfer import retry
from pkg.initializers.uri import HfUri

from .card import model_card
from .config import ExportConfig
from .outputs import Selection

# Read by huggingface_hub when it is imported: the LFS protocol, no progress bars in `kubectl logs`, no
# token or telemetry from the machine's own files.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


def export_hub(config: ExportConfig, selection: Selection, run: dict[str, Any]) -> dict[str, Any]:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    uri = config.shared.uri
    assert isinstance(uri, HfUri)
    shared = config.shared
    if shared.hf_login:
        raise InitializerError(
            "HF_ENDPOINT with user:password@ is not supported for exports: use ACCESS_TOKEN"
        )
    if not shared.access_token:
        raise InitializerError(
            "ACCESS_TOKEN (or HF_TOKEN) is not set: exporting to the Hub needs a write token"
        )
    branch = uri.revision or "main"
    where = f"hf://{uri.repo_id}@{branch}"
    api = HfApi(
        endpoint=shared.hf_endpoint, token=shared.access_token, library_name="kubeflow-model-exporter"
    )

    def step(fn: Any, what: str) -> Any:
        def once() -> Any:
            try:
                try:
                    return fn()
                except RuntimeError as wrapped:  # the client wraps an LFS upload's error in one
                    raise wrapped.__cause__ or wrapped from None
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                detail = one_line(getattr(exc, "server_message", None) or str(exc).split("\n")[0], 200)
                if status == 429 or status >= 500:
                    after = exc.response.headers.get("Retry-After") if exc.response is not None else None
                    raise TransientError(f"{what}: HTTP {status}", parse_retry_after(after)) from None
                hint = {
                    401: "check that ACCESS_TOKEN is valid",
                    403: f"check that ACCESS_TOKEN may write to {uri.repo_id}",
                    404: f"check that {uri.repo_id} exists or that the token may create it",
                }.get(status, "check the repository and ACCESS_TOKEN")
                raise InitializerError(f"the Hub refused {what} (HTTP {status}: {detail}); {hint}") from None
            except httpx2.TransportError as exc:
                raise TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}") from None

        return retry(once, what, shared.tuning)

    repo = step(
        lambda: api.create_repo(uri.repo_id, private=not config.hf_public, exist_ok=True, repo_type="model"),
        f"creating {uri.repo_id}",
    )
    log(f"repo {repo} ready ({'public' if config.hf_public else 'private'} when created by this export)")
    if branch != "main":
        step(
            lambda: api.create_branch(uri.repo_id, branch=branch, exist_ok=True), f"creating branch {branch}"
        )
    base = f"{uri.subpath}/" if uri.subpath else ""
    operations = [
        CommitOperationAdd(path_in_repo=base + f.path, path_or_fileobj=str(f.source))
        for f in selection.files
        if f.path != "README.md"
    ]
    if len(operations) != len(selection.files):
        log("the export's README.md is replaced by a model card made from the run's summary")
    card = model_card(run, uri.repo_id).encode()
    operations.append(CommitOperationAdd(path_in_repo=base + "README.md", path_or_fileobj=card))
    log(f"committing {len(operations)} files ({human_bytes(selection.total_bytes)}) to {where}")
    message = f"Fine-tuned {selection.what} ({run.get('method', 'unknown method')}, {run.get('steps')} steps)"
    commit = step(
        lambda: api.create_commit(
            uri.repo_id,
            operations=[CommitOperationAdd(op.path_in_repo, op.path_or_fileobj) for op in operations],
            commit_message=message,
            revision=branch,
            num_threads=min(shared.tuning.concurrency, 8),
        ),
        f"committing to {where}",
    )
    log(f"committed to {where}: commit {commit.oid} ({commit.commit_url})")
    return {"commit": commit.oid, "commit_url": commit.commit_url, "uri": f"hf://{uri.repo_id}@{commit.oid}"}
