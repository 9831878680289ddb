"""HTTPS end to end: the Hub and S3 behind a TLS proxy whose certificate only a test CA vouches for.
Trusted through SSL_CERT_FILE (Hub) and AWS_CA_BUNDLE (S3) as in a cluster with a private CA; refused
with one clear line when the CA is not given."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.initializers.conftest import HUB_TOKEN, MOTO_ONLY, Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy
from tests.support.hub_server import HubServer
from tests.support.s3_server import S3Server
from tests.support.tls import make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def s3_tls(s3: S3Server, certificates: tuple[Path, Path, Path]) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint).serve_tls(*certificates[1:]).start() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def hub_tls(hub: HubServer, certificates: tuple[Path, Path, Path]) -> Iterator[FaultProxy]:
    with FaultProxy(hub.endpoint).serve_tls(*certificates[1:]).start() as proxy:
        yield proxy


@MOTO_ONLY  # about our TLS client, not the store: one server is enough
def test_s3_over_https(
    run: Runner, s3: S3Server, s3_tls: FaultProxy, certificates: tuple, tmp_path: Path
) -> None:
    objects = {f"t/{i}.bin": os.urandom(3000 + i) for i in range(5)} | {"t/big.bin": os.urandom(600 * 1024)}
    s3.fill("tls", objects)
    env = {
        **s3.env(),
        "ENDPOINT": s3_tls.endpoint,
        "STORAGE_URI": "s3://tls/t",
        "OUTPUT_PATH": str(tmp_path / "a"),
    }
    assert s3_tls.endpoint.startswith("https://")
    result = run("dataset", **env, AWS_CA_BUNDLE=str(certificates[0]))
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path / "a") == {k.removeprefix("t/"): v for k, v in objects.items()}
    assert s3_tls.count("/tls/t/big.bin") == 3  # ranged parts, over TLS

    refused = run("dataset", **{**env, "OUTPUT_PATH": str(tmp_path / "b")})
    assert refused.returncode != 0
    line = one_error_line(refused.stderr)
    assert "not trusted" in line and "AWS_CA_BUNDLE" in line
    assert "attempts" not in line  # not retried: retrying cannot fix a certificate


def test_hub_over_https(
    run: Runner, hub: HubServer, hub_tls: FaultProxy, certificates: tuple, tmp_path: Path
) -> None:
    files = {"config.json": b"{}", "model.safetensors": os.urandom(300 * 1024)}
    hub.add_repo("org/tls-model", files)
    out = tmp_path / "m"
    env = {"HF_ENDPOINT": hub_tls.endpoint, "STORAGE_URI": "hf://org/tls-model", "OUTPUT_PATH": str(out)}
    result = run("model", **env, SSL_CERT_FILE=str(certificates[0]), ACCESS_TOKEN=HUB_TOKEN)
    assert result.returncode == 0, result.stderr
    assert tree(out) == files
    assert hub_tls.count("/resolve/") >= 2

    refused = run("model", **{**env, "OUTPUT_PATH": str(tmp_path / "n")}, ACCESS_TOKEN=HUB_TOKEN)
    assert refused.returncode != 0
    assert "not trusted" in one_error_line(refused.stderr) and "SSL_CERT_FILE" in refused.stderr


@MOTO_ONLY
def test_s3_over_https_through_a_proxy(
    run: Runner, s3: S3Server, s3_tls: FaultProxy, certificates: tuple, tmp_path: Path
) -> None:
    """HTTPS_PROXY: listing and object GETs go through CONNECT tunnels, with the proxy login."""
    objects = {f"p/{i}.bin": os.urandom(2000 + i) for i in range(4)}
    s3.fill("tunnel", objects)
    with FaultProxy(s3.endpoint).start() as proxy:
        env = {**s3.env(), "ENDPOINT": s3_tls.endpoint, "STORAGE_URI": "s3://tunnel/p"}
        env |= {"OUTPUT_PATH": str(tmp_path / "o"), "AWS_CA_BUNDLE": str(certificates[0])}
        env["HTTPS_PROXY"] = proxy.endpoint.replace("http://", "http://tunnel-user:tunnel-pass@")
        result = run("dataset", **env)
        tunnels = [r for r in proxy.requests if r.method == "CONNECT"]
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path / "o") == {k.removeprefix("p/"): v for k, v in objects.items()}
    target = s3_tls.endpoint.removeprefix("https://")
    assert tunnels and all(r.path == target and r.proxy_user == "tunnel-user" for r in tunnels)
    assert proxy.requests == tunnels  # nothing went around the tunnels
    assert "tunnel-pass" not in result.stdout + result.stderr
