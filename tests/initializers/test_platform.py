"""A platform engineer's common mistakes, each answered at once with one line saying what to do: ENDPOINT
without a scheme or with the bucket in its path, TLS against a plain-HTTP server and the reverse, a reused
workspace, a bucket-only model URI, an OUTPUT_PATH the initializer cannot write; and secrets masked only
where they stand as values. Real servers: moto and `rclone serve s3` (plain and TLS), the Hub test server,
a TLS proxy."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkg.initializers.config import load_config
from pkg.initializers.errors import InitializerError, redact, register_secret
from tests.initializers.conftest import Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy
from tests.support.hub_server import HubServer
from tests.support.s3_server import S3Server, start_rclone_s3
from tests.support.tls import make_certificates


def refused(result, *words: str) -> str:
    """The run failed with one error line holding `words`, without retrying."""
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_error_line(result.stderr)
    for word in words:
        assert word in line, line
    assert "retry" not in result.stdout and "attempts" not in line, result.stdout
    return line


# -- ENDPOINT ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "minio:9000", "ftp://minio:9000"])
def test_endpoint_without_http_scheme_is_refused(endpoint: str) -> None:
    with pytest.raises(InitializerError, match=r"needs http:// or https://, e.g. http://"):
        load_config("dataset", {"STORAGE_URI": "s3://datasets/alpaca", "ENDPOINT": endpoint})


def test_endpoint_holding_the_bucket_is_refused() -> None:
    env = {"STORAGE_URI": "s3://datasets/alpaca", "ENDPOINT": "http://minio:9000/datasets/"}
    with pytest.raises(
        InitializerError, match=r"ends with the bucket 'datasets'.*ENDPOINT=http://minio:9000 "
    ):
        load_config("dataset", env)
    # The bucket is what STORAGE_URI names, not a guess: another path is the store's own (a gateway).
    assert (
        load_config("dataset", {**env, "STORAGE_URI": "s3://other"}).endpoint == "http://minio:9000/datasets"
    )


def test_endpoint_with_another_path_says_so(run: Runner, s3: S3Server, tmp_path: Path) -> None:
    s3.fill("pathy", {"p/a.txt": b"a"})
    env = {**s3.env(), "ENDPOINT": s3.endpoint + "/gateway", "STORAGE_URI": "s3://pathy/p"}
    line = refused(run("dataset", **env, OUTPUT_PATH=str(tmp_path / "o")))
    assert "ENDPOINT's path /gateway" in line or "ENDPOINT should be the store's address alone" in line, line
    assert "disappeared" not in line


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def rclone_tls(
    tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path, Path]
) -> Iterator[S3Server]:
    root = tmp_path_factory.mktemp("rclone-tls")
    (root / "secure" / "p").mkdir(parents=True)
    (root / "secure" / "p" / "a.txt").write_text("a")
    server = start_rclone_s3(root, tls=tls_files[1:])
    yield server
    server.stop()


def test_http_to_a_tls_store_is_not_retried(
    run: Runner, rclone_tls: S3Server, tls_files: tuple, tmp_path: Path
) -> None:
    plain = rclone_tls.endpoint.replace("https://", "http://")
    env = {
        **rclone_tls.env(),
        "ENDPOINT": plain,
        "STORAGE_URI": "s3://secure/p",
        "OUTPUT_PATH": str(tmp_path / "o"),
    }
    refused(run("dataset", **env), f"{plain} speaks TLS", f"as {rclone_tls.endpoint}")
    fixed = run("dataset", **{**env, "ENDPOINT": rclone_tls.endpoint, "AWS_CA_BUNDLE": str(tls_files[0])})
    assert fixed.returncode == 0, fixed.stderr
    assert tree(tmp_path / "o") == {"a.txt": b"a"}


@pytest.mark.parametrize("s3", ["moto"], indirect=True)  # a client-side check: one server is enough
def test_https_to_a_plain_store_is_not_retried(run: Runner, s3: S3Server, tmp_path: Path) -> None:
    s3.fill("plain", {"p/a.txt": b"a"})
    tls = s3.endpoint.replace("http://", "https://")
    env = {**s3.env(), "ENDPOINT": tls, "STORAGE_URI": "s3://plain/p", "OUTPUT_PATH": str(tmp_path / "o")}
    refused(run("dataset", **env), f"{tls} speaks plain HTTP", f"as {s3.endpoint}")


def test_hub_endpoint_of_the_wrong_protocol(
    run: Runner, hub: HubServer, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    hub.add_repo("org/proto", {"config.json": b"{}"})
    out = str(tmp_path / "o")
    as_tls = hub.endpoint.replace("http://", "https://")
    refused(
        run("model", HF_ENDPOINT=as_tls, STORAGE_URI="hf://org/proto", OUTPUT_PATH=out), "speaks plain HTTP"
    )
    with FaultProxy(hub.endpoint).serve_tls(*tls_files[1:]).start() as proxy:  # a Python TLS server
        as_plain = proxy.endpoint.replace("https://", "http://")
        line = refused(run("model", HF_ENDPOINT=as_plain, STORAGE_URI="hf://org/proto", OUTPUT_PATH=out))
    assert f"{as_plain} speaks TLS" in line and "HF_ENDPOINT" in line


# -- OUTPUT_PATH ---------------------------------------------------------------------------------------------
def test_reused_workspace(run: Runner, s3: S3Server, tmp_path: Path) -> None:
    s3.fill(
        "workspace",
        {"alpaca/train.jsonl": b'{"a": 1}\n', "hub/data/train.parquet": b"PAR1", "hub/README.md": b"#"},
    )
    out = tmp_path / "dataset"
    env = {**s3.env(), "OUTPUT_PATH": str(out)}
    assert run("dataset", **env, STORAGE_URI="s3://workspace/alpaca").returncode == 0

    line = refused(run("dataset", **env, STORAGE_URI="s3://workspace/hub"), "OVERWRITE=true")
    assert (
        "a completed download of dataset s3://workspace/alpaca" in line
        and "this run is for dataset s3://workspace/hub" in line
    )
    assert tree(out) == {"train.jsonl": b'{"a": 1}\n'}  # untouched

    replaced = run("dataset", **env, STORAGE_URI="s3://workspace/hub", OVERWRITE="true")
    assert replaced.returncode == 0, replaced.stderr
    assert "OVERWRITE=true: emptied" in replaced.stdout
    assert tree(out) == {"data/train.parquet": b"PAR1", "README.md": b"#"}

    # The same source with a trailing slash is the same source: nothing fetched again.
    again = run("dataset", **env, STORAGE_URI="s3://workspace/hub/")
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout


def test_unfinished_download_of_another_source_is_named(run: Runner, s3: S3Server, tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / ".initializer").mkdir(parents=True)
    other = {"kind": "model", "storage_uri": "hf://org/old"}
    (out / ".initializer/journal.jsonl").write_text(json.dumps({"request": other}) + "\n")
    s3.fill("unfinished", {"p/a.txt": b"a"})
    refused(
        run("model", **s3.env(), STORAGE_URI="s3://unfinished/p", OUTPUT_PATH=str(out)),
        "unfinished download of model hf://org/old",
    )


def test_stray_files_are_refused_and_overwrite_stays_inside(
    run: Runner, s3: S3Server, tmp_path: Path
) -> None:
    s3.fill("stray", {"p/a.txt": b"a"})
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "precious.txt").write_text("mine")
    out = tmp_path / "o"
    (out / "old").mkdir(parents=True)
    (out / "old" / "notes.txt").write_text("x")
    (out / "link").symlink_to(outside / "keep")
    (out / "lost+found").mkdir()  # a fresh ext4 volume's: not a stray
    env = {**s3.env(), "STORAGE_URI": "s3://stray/p", "OUTPUT_PATH": str(out)}
    line = refused(run("dataset", **env), "files no initializer put there", "'link' (a symlink)", "'old/'")
    assert "lost+found" not in line

    done = run("dataset", **env, OVERWRITE="true")
    assert done.returncode == 0, done.stderr
    assert tree(out) == {"a.txt": b"a"}
    assert (outside / "keep" / "precious.txt").read_text() == "mine"  # the link went, not what it pointed to


@pytest.mark.parametrize("s3", ["rclone"], indirect=True)  # a layout check: one server is enough
def test_bucket_only_model_uri_names_the_one_to_use(run: Runner, s3: S3Server, tmp_path: Path) -> None:
    s3.fill("models", {"tiny/config.json": b"{}", "tiny/model.safetensors": b"w" * 100})
    env = {**s3.env(), "OUTPUT_PATH": str(tmp_path / "m")}
    refused(
        run("model", **env, STORAGE_URI="s3://models"), "tiny/config.json", "set STORAGE_URI=s3://models/tiny"
    )
    assert not (tmp_path / "m" / "tiny").exists()
    ok = run("model", **env, STORAGE_URI="s3://models/tiny")
    assert ok.returncode == 0, ok.stderr
    assert tree(tmp_path / "m") == {"config.json": b"{}", "model.safetensors": b"w" * 100}


@pytest.mark.parametrize("s3", ["moto"], indirect=True)
def test_unwritable_output_path_is_named_before_listing(run: Runner, s3: S3Server, tmp_path: Path) -> None:
    """Here a file stands where the volume should be (these tests run as root, whom permissions do not stop;
    tests/images runs uid 1000 on a root-owned volume)."""
    s3.fill("owned", {"p/a.txt": b"a"})
    (tmp_path / "volume").write_text("not a folder")
    out = tmp_path / "volume" / "dataset"
    result = run("dataset", **s3.env(), STORAGE_URI="s3://owned/p", OUTPUT_PATH=str(out))
    refused(result, f"cannot read {out}", f"runs as uid {os.getuid()}", "fsGroup", "chown ")
    assert "listing" not in result.stdout


# -- secrets -------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_secrets_are_masked_as_whole_values() -> None:
    register_secret("SECRET")
    register_secret("hf_WholeTokenValue_0123456789")
    assert redact("SECRET_ACCESS_KEY=SECRET") == "SECRET_ACCESS_KEY=***"
    assert redact("MYSECRET and SECRETS stay") == "MYSECRET and SECRETS stay"
    assert redact("token=hf_WholeTokenValue_0123456789&x") == "token=***&x"
    assert redact("Bearer%20hf_WholeTokenValue_0123456789") == "Bearer%20***"  # URL-encoded text too
    assert redact("bad token hf_WholeTokenValue_01...") == "bad token ***..."  # an echo cut short
