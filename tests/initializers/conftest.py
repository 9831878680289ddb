"""Fixtures: S3 servers (moto and `rclone serve s3`, credentials enforced) and a Hub server, each behind a
fault proxy, and a helper that runs the real entry points as subprocesses with the environment the Kubeflow
SDK sets.

`s3` is parametrized over both S3 servers, so every S3 download test runs against two implementations. A
test that needs what only moto has (IAM and STS, keys a filesystem cannot hold) says so with `MOTO_ONLY`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fault_proxy import FaultProxy
from tests.support.hub_server import HubServer, start_hub_server
from tests.support.s3_server import S3Server, start_rclone_s3, start_s3_server

REPO = Path(__file__).resolve().parents[2]
HUB_TOKEN = "hf_TestTokenThatMustNeverBePrinted42"

# Small parts so multi-part paths run on small files; fast retries so fault tests stay quick.
FAST = {
    "INIT_PART_SIZE": str(256 * 1024),
    "INIT_RETRY_BASE": "0.05",
    "INIT_RETRY_CAP": "2",
    "INIT_PROGRESS_INTERVAL": "0.5",
    "INIT_READ_TIMEOUT": "10",
}


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: no AWS/HF settings leak in from the machine running the tests."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HOME": str(home / "hf-home"),
        **FAST,
    }


S3_SERVERS = ("moto", "rclone")
# For a test that needs moto's IAM / STS, or keys that a filesystem (rclone's store) cannot hold.
MOTO_ONLY = pytest.mark.parametrize("s3", ["moto"], indirect=True)


class _S3Servers:
    """Each kind of S3 server, started on first use and kept (with its fault proxy) for the session."""

    def __init__(self, root: Path):
        self.root = root
        self.servers: dict[str, S3Server] = {}
        self.proxies: dict[str, FaultProxy] = {}

    def server(self, kind: str) -> S3Server:
        if kind not in self.servers:
            started = start_s3_server(auth=True) if kind == "moto" else start_rclone_s3(self.root / kind)
            self.servers[kind] = started
        return self.servers[kind]

    def proxy(self, kind: str) -> FaultProxy:
        if kind not in self.proxies:
            self.proxies[kind] = FaultProxy(self.server(kind).endpoint).start()
        return self.proxies[kind]

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def _s3_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_S3Servers]:
    servers = _S3Servers(tmp_path_factory.mktemp("s3"))
    yield servers
    servers.stop()


@pytest.fixture(scope="session", params=S3_SERVERS)
def s3(request: pytest.FixtureRequest, _s3_servers: _S3Servers) -> S3Server:
    return _s3_servers.server(request.param)


@pytest.fixture
def s3_proxy(s3: S3Server, _s3_servers: _S3Servers) -> FaultProxy:
    """The fault proxy in front of `s3`, with no faults and an empty request log."""
    proxy = _s3_servers.proxy(s3.kind)
    proxy.clear()
    proxy.reset_log()
    return proxy


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = start_hub_server(tmp_path_factory.mktemp("hub"), token=HUB_TOKEN, lfs_threshold=64 * 1024)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _hub_proxy(hub: HubServer) -> Iterator[FaultProxy]:
    with FaultProxy(hub.endpoint).start() as proxy:
        yield proxy


@pytest.fixture
def hub_proxy(_hub_proxy: FaultProxy, hub: HubServer) -> FaultProxy:
    _hub_proxy.clear()
    _hub_proxy.reset_log()
    hub.reset_log()
    return _hub_proxy


class Runner:
    """Runs `python -m pkg.initializers.{dataset,model}` with a given environment."""

    def __init__(self, tmp_path: Path):
        self.home = tmp_path / "home"
        self.home.mkdir()

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**base_env(self.home), **extra}

    def __call__(self, kind: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", f"pkg.initializers.{kind}"],
            cwd=REPO,
            env=self.env(extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, kind: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", f"pkg.initializers.{kind}"],
            cwd=REPO,
            env=self.env(extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def run(tmp_path: Path) -> Runner:
    return Runner(tmp_path)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root except the initializer's state folder, as path -> bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".initializer/")
    }


def one_error_line(stderr: str) -> str:
    """Assert stderr is exactly one `error: ...` line without a traceback, and return it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]
