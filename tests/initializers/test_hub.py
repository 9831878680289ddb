"""Hugging Face Hub end to end: the real entry points against the local Hub server over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.initializers.conftest import HUB_TOKEN, Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.hub_server import HubServer, commit_id

KiB = 1024


@pytest.fixture(scope="module")
def repos(hub: HubServer) -> dict[str, dict[str, bytes]]:
    model = {
        "config.json": b'{"model_type": "tiny"}',
        "model.safetensors": os.urandom(700 * KiB),  # LFS, 3 ranged parts of 256 KiB
        "pytorch_model.bin": os.urandom(10 * KiB),
        "flax_model.msgpack": b"flax",
        "tokenizer/tokenizer.json": b'{"vocab": {}}',
    }
    legacy = {"config.json": b"{}", "pytorch_model.bin": os.urandom(300 * KiB), "tf_model.h5": b"h5"}
    data_main = {
        "README.md": b"---\nconfigs: [{config_name: default, data_files: data/train/*.jsonl}]\n---\n",
        "data/train/part-0.jsonl": b'{"text": "a"}\n' * 500,
        "data/train/part-1.jsonl": b'{"text": "b"}\n' * 500,
        "data/test/part-0.jsonl": b'{"text": "c"}\n' * 50,
        "data/images/big.parquet": os.urandom(400 * KiB),
    }
    data_v1 = {"README.md": b"old", "data/train/part-0.jsonl": b'{"text": "v1"}\n'}
    hub.add_repo("org/tiny-model", model)
    hub.add_repo("org/legacy-model", legacy)
    hub.add_repo("org/private-data", data_main, repo_type="dataset", private=True)
    hub.add_repo("org/private-data", data_v1, repo_type="dataset", revision="v1")
    hub.add_repo("org/public-data", data_main, repo_type="dataset")
    return {"model": model, "legacy": legacy, "data": data_main, "data_v1": data_v1}


def hub_env(proxy: FaultProxy, uri: str, out: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": proxy.endpoint, "STORAGE_URI": uri, "OUTPUT_PATH": str(out), **extra}


def test_model_prefers_safetensors(run: Runner, hub_proxy: FaultProxy, repos: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run("model", **hub_env(hub_proxy, "hf://org/tiny-model", out))
    assert result.returncode == 0, result.stderr
    expected = {k: v for k, v in repos["model"].items() if not k.endswith((".bin", ".msgpack"))}
    assert tree(out) == expected
    marker = json.loads((out / ".initializer/manifest.json").read_text())
    assert marker["resolved"]["commit"] == commit_id("model", "org/tiny-model", "main")
    files = {f["path"]: f for f in marker["files"]}
    assert "sha256" in files["model.safetensors"] and "git_sha1" in files["config.json"]
    assert hub_proxy.count("/resolve/") == 2 + 3  # two small files, three parts of the safetensors


def test_through_an_http_proxy(
    run: Runner, hub: HubServer, hub_proxy: FaultProxy, repos: dict, tmp_path: Path
) -> None:
    """HTTP_PROXY carries the Hub API calls and the file downloads alike."""
    out = tmp_path / "model"
    env = {"HF_ENDPOINT": hub.endpoint, "HTTP_PROXY": hub_proxy.endpoint, "ACCESS_TOKEN": HUB_TOKEN}
    result = run("model", STORAGE_URI="hf://org/tiny-model", OUTPUT_PATH=str(out), **env)
    assert result.returncode == 0, result.stderr
    assert tree(out)["model.safetensors"] == repos["model"]["model.safetensors"]
    assert hub_proxy.count("/resolve/") == 2 + 3
    assert hub_proxy.count("/api/models/org/tiny-model") >= 1
    assert all(r.forward for r in hub_proxy.requests)


def test_lfs_files_redirected_to_another_host(
    run: Runner, hub: HubServer, hub_proxy: FaultProxy, repos: dict, tmp_path: Path
) -> None:
    """As on the Hub, LFS resolves answer 302 to a CDN host: followed, without sending the token there."""
    hub.lfs_redirect = hub.endpoint.replace("127.0.0.1", "localhost")
    try:
        out = tmp_path / "data"
        env = hub_env(hub_proxy, "hf://org/private-data", out, ACCESS_TOKEN=HUB_TOKEN)
        result = run("dataset", **env)
    finally:
        hub.lfs_redirect = None
    assert result.returncode == 0, result.stderr
    assert tree(out) == repos["data"]
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn and all(r.status == 206 or r.status == 200 for r in cdn)
    assert not any(r.authorized for r in cdn)
    assert hub_proxy.count("/resolve/") == len(repos["data"]) + len(cdn) - 1  # one 302 per LFS part


def test_model_falls_back_to_bin(run: Runner, hub_proxy: FaultProxy, repos: dict, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = run("model", **hub_env(hub_proxy, "hf://org/legacy-model", out))
    assert result.returncode == 0, result.stderr
    assert tree(out) == {"config.json": b"{}", "pytorch_model.bin": repos["legacy"]["pytorch_model.bin"]}
    assert "keeping .bin/.pt" in result.stdout


def test_private_dataset_needs_token(run: Runner, hub_proxy: FaultProxy, repos: dict, tmp_path: Path) -> None:
    denied = run("dataset", **hub_env(hub_proxy, "hf://org/private-data", tmp_path / "a"))
    assert denied.returncode == 1
    assert "set ACCESS_TOKEN" in one_error_line(denied.stderr)

    wrong = run(
        "dataset",
        **hub_env(hub_proxy, "hf://org/private-data", tmp_path / "b", ACCESS_TOKEN="hf_wrong_token_1"),
    )
    assert wrong.returncode == 1
    assert "refused ACCESS_TOKEN" in one_error_line(wrong.stderr)
    assert "hf_wrong_token_1" not in wrong.stdout + wrong.stderr

    out = tmp_path / "c"
    ok = run("dataset", **hub_env(hub_proxy, "hf://org/private-data", out, ACCESS_TOKEN=HUB_TOKEN))
    assert ok.returncode == 0, ok.stderr
    assert tree(out) == repos["data"]
    assert HUB_TOKEN not in ok.stdout + ok.stderr
    leaked = [
        p
        for p in [*out.rglob("*"), *tmp_path.rglob("*")]
        if p.is_file() and HUB_TOKEN.encode() in p.read_bytes()
    ]
    assert leaked == []  # no token file, no token in the marker


def test_revision_and_subpath(run: Runner, hub_proxy: FaultProxy, repos: dict, tmp_path: Path) -> None:
    out = tmp_path / "v1"
    result = run("dataset", **hub_env(hub_proxy, "hf://org/private-data@v1", out, ACCESS_TOKEN=HUB_TOKEN))
    assert result.returncode == 0, result.stderr
    assert tree(out) == repos["data_v1"]

    out = tmp_path / "sub"
    result = run(
        "dataset", **hub_env(hub_proxy, "hf://org/public-data/data/train", out, IGNORE_PATTERNS="*-1.jsonl")
    )
    assert result.returncode == 0, result.stderr
    assert tree(out) == {"data/train/part-0.jsonl": repos["data"]["data/train/part-0.jsonl"]}


def test_hub_refs_written_as_they_are(
    run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The Hub's parquet conversion branch, `refs/convert/parquet`, needs no URL-encoding in STORAGE_URI."""
    parquet = {"default/train/0000.parquet": os.urandom(3000), "default/test/0000.parquet": os.urandom(500)}
    hub.add_repo("org/converted", {"data.csv": b"a,b\n"}, repo_type="dataset")
    hub.add_repo("org/converted", parquet, repo_type="dataset", revision="refs/convert/parquet")
    out = tmp_path / "out"
    result = run(
        "dataset", **hub_env(hub_proxy, "hf://org/converted@refs/convert/parquet/default/train", out)
    )
    assert result.returncode == 0, result.stderr
    assert tree(out) == {"default/train/0000.parquet": parquet["default/train/0000.parquet"]}


def test_gated_model_needs_token(run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path) -> None:
    hub.add_repo("org/gated-model", {"config.json": b"{}", "model.safetensors": b"w" * 1000}, gated=True)
    denied = run("model", **hub_env(hub_proxy, "hf://org/gated-model", tmp_path / "a"))
    assert denied.returncode == 1
    assert "gated" in one_error_line(denied.stderr) and "ACCESS_TOKEN" in denied.stderr
    ok = run("model", **hub_env(hub_proxy, "hf://org/gated-model", tmp_path / "b", ACCESS_TOKEN=HUB_TOKEN))
    assert ok.returncode == 0, ok.stderr
    assert tree(tmp_path / "b") == {"config.json": b"{}", "model.safetensors": b"w" * 1000}


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://org/missing", "not found"),
        ("hf://org/public-data@nope", "revision 'nope' not found"),
        ("hf://org/public-data/no/such/dir", "path 'no/such/dir' not found"),
        ("hf://org/tiny-model", "not found"),  # a model repo asked of the dataset initializer
    ],
)
def test_hub_errors(
    run: Runner, hub_proxy: FaultProxy, repos: dict, tmp_path: Path, uri: str, message: str
) -> None:
    result = run("dataset", **hub_env(hub_proxy, uri, tmp_path / "out"))
    assert result.returncode == 1
    assert message in one_error_line(result.stderr)


def test_checksum_mismatch_is_refetched(
    run: Runner, hub_proxy: FaultProxy, repos: dict, tmp_path: Path
) -> None:
    """Corrupt one byte in flight, once per file: the SHA-256 / git blob checks catch it and refetch."""

    hub_proxy.add(FaultRule(corrupt=100, times=1, match="big.parquet"))
    hub_proxy.add(FaultRule(corrupt=3, times=1, match="part-1.jsonl"))
    out = tmp_path / "out"
    result = run("dataset", **hub_env(hub_proxy, "hf://org/public-data", out, INIT_PART_SIZE=str(1024 * KiB)))
    assert result.returncode == 0, result.stderr
    assert tree(out) == repos["data"]
    assert "sha256 mismatch" in result.stdout and "git-sha1 mismatch" in result.stdout
    assert hub_proxy.pending() == 0
