"""Export to the project's Hub-compatible test server with huggingface_hub's client: the repo created private,
one commit (the weights through LFS) with a model card, the commit id logged; a rerun sends nothing; a commit
that keeps failing leaves the repo without the export; no token, no export."""

from __future__ import annotations

from pathlib import Path

from tests.support.fixtures import HUB_TOKEN as TOKEN
from tests.support.hub_server import HubServer

from .conftest import Exporter, one_error_line, write_run


def test_export_creates_a_private_repo_in_one_commit_with_a_card(
    hub: HubServer, export: Exporter, tmp_path: Path
) -> None:
    out = write_run(tmp_path)
    env = {"STORAGE_URI": "hf://acme/tuned-lora", "SOURCE_PATH": str(out), "HF_ENDPOINT": hub.endpoint}
    hub.fail_commits = 1  # a 500: retried
    done = export(**env, ACCESS_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    commit = hub.commits[-1]
    assert f"commit {commit['oid']}" in done.stdout
    assert commit["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.is_private("acme/tuned-lora", "model")
    main = hub.repo_dir("acme/tuned-lora") / "main"
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (main / "adapter_model.safetensors").read_bytes() == weights
    assert hub.count("/_lfs/", method="PUT") == 1  # the weights went through LFS, once
    card = (main / "README.md").read_text()
    assert "base_model: acme/base-1b" in card and "| final loss | 1.2500 |" in card

    commits = len(hub.commits)
    again = export(**env, ACCESS_TOKEN=TOKEN)
    assert again.returncode == 0, again.stderr
    assert len(hub.commits) == commits and hub.count("/_lfs/", method="PUT") == 1


def test_branch_export_and_failures(hub: HubServer, export: Exporter, tmp_path: Path) -> None:
    out = write_run(tmp_path, model=True)
    env = {"SOURCE_PATH": str(out), "HF_ENDPOINT": hub.endpoint, "INIT_MAX_ATTEMPTS": "2"}
    refused = export(**env, STORAGE_URI="hf://acme/tuned-full")
    assert refused.returncode == 1 and "ACCESS_TOKEN" in one_error_line(refused.stderr)
    down = export(**{**env, "HF_ENDPOINT": "http://127.0.0.1:9"}, STORAGE_URI="hf://a/b", ACCESS_TOKEN=TOKEN)
    assert down.returncode == 1 and "still failing after 2 attempts" in one_error_line(down.stderr)

    hub.fail_commits = 100  # the Hub keeps failing: the LFS objects are up, but no commit, so no export
    failed = export(**env, STORAGE_URI="hf://acme/tuned-full", ACCESS_TOKEN=TOKEN)
    assert failed.returncode == 1
    assert "still failing after 2 attempts" in one_error_line(failed.stderr)
    assert list((hub.repo_dir("acme/tuned-full") / "main").iterdir()) == []
    hub.fail_commits = 0

    done = export(**env, STORAGE_URI="hf://acme/tuned-full@v1", ACCESS_TOKEN=TOKEN, HF_PUBLIC="true")
    assert done.returncode == 0, done.stderr
    branch = hub.repo_dir("acme/tuned-full") / "v1"
    assert (branch / "model.safetensors").stat().st_size == 2_600_000  # EXPORT default: the merged model
    assert "library_name: transformers" in (branch / "README.md").read_text()
