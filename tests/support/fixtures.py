"""Fixtures and helpers the initializer and exporter tests share: the S3 servers (moto and `rclone serve s3`,
credentials enforced) and the Hub server, each behind a fault proxy, and a runner of an image's entry point
(`python -m ...`) in the clean environment the Kubeflow SDK gives it. A conftest imports the fixtures it
uses (which registers them).

`s3` is parametrized over both S3 servers, so every S3 test runs against two implementations. A test that
needs what only moto has (IAM and STS, keys a filesystem cannot hold) says so with `MOTO_ONLY`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


class EntryPoint:
    """Runs `python -m <module>` (an image's entry point) with base_env and the test's own variables."""

    def __init__(self, tmp_path: Path):
        self.home = tmp_path / "home"
        self.home.mkdir(exist_ok=True)

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**base_env(self.home), **extra}

    def run(self, module: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=REPO,
            env=self.env(extra),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, module: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=REPO,
            env=self.env(extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


S3_SERVERS = ("moto", "rclone")
# For a test that needs moto's IAM / STS, or keys that a filesystem (rclone's store) cannot hold.
MOTO_ONLY = pytest.mark.parametrize("s3", ["moto"], indirect=True)


class S3Servers:
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
def s3_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Servers]:
    servers = S3Servers(tmp_path_factory.mktemp("s3"))
    yield servers
    servers.stop()


@pytest.fixture(scope="session", params=S3_SERVERS)
def s3(request: pytest.FixtureRequest, s3_servers: S3Servers) -> S3Server:
    return s3_servers.server(request.param)


@pytest.fixture
def s3_proxy(s3: S3Server, s3_servers: S3Servers) -> FaultProxy:
    """The fault proxy in front of `s3`, with no faults and an empty request log."""
    proxy = s3_servers.proxy(s3.kind)
    proxy.clear()
    proxy.reset_log()
    return proxy


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The project's Hub-compatible server; it accepts HUB_TOKEN only, and stores files over 64 KiB in LFS."""
    server = start_hub_server(tmp_path_factory.mktemp("hub"), token=HUB_TOKEN, lfs_threshold=64 * 1024)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hub_proxies(hub: HubServer) -> Iterator[FaultProxy]:
    with FaultProxy(hub.endpoint).start() as proxy:
        yield proxy


@pytest.fixture
def hub_proxy(hub_proxies: FaultProxy, hub: HubServer) -> FaultProxy:
    """The fault proxy in front of `hub`, with no faults and empty request logs."""
    hub_proxies.clear()
    hub_proxies.reset_log()
    hub.reset_log()
    return hub_proxies


def one_error_line(stderr: str) -> str:
    """Assert stderr is exactly one `error: ...` line without a traceback, and return it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
