"""Fixtures: S3 servers (tests/support/fixtures.py, shared with the exporter's tests) and a Hub server, each
behind a fault proxy, and a runner of the real entry points as subprocesses with the environment the Kubeflow
SDK sets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.fixtures import (  # the fixtures among them are registered by being imported here
    HUB_TOKEN,
    MOTO_ONLY,
    REPO,
    EntryPoint,
    hub,
    hub_proxies,
    hub_proxy,
    one_error_line,
    s3,
    s3_proxy,
    s3_servers,
)

__all__ = [
    "HUB_TOKEN",
    "MOTO_ONLY",
    "REPO",
    "hub",
    "hub_proxies",
    "hub_proxy",
    "one_error_line",
    "s3",
    "s3_proxy",
    "s3_servers",
]


class Runner(EntryPoint):
    """Runs `python -m pkg.initializers.{dataset,model}` with a given environment."""

    def __call__(self, kind: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run(f"pkg.initializers.{kind}", timeout, **extra)

    def popen(self, kind: str, **extra: str) -> subprocess.Popen[str]:
        return self.start(f"pkg.initializers.{kind}", **extra)


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
