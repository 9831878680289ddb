"""Servers that mishandle Range: the test Hub ignoring it (200 with the whole file), answering 200 with the
range but no Content-Range, or sending another range than asked. (rclone serve s3, which answers 200 with
an exact Content-Range, runs every S3 download test: see conftest.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.initializers.conftest import HUB_TOKEN, Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.hub_server import HubServer

KiB = 1024


@pytest.fixture
def range_mode(hub: HubServer) -> Iterator[HubServer]:
    """The Hub server, its range_mode reset after the test."""
    yield hub
    hub.range_mode = "honour"


def hub_env(hub: HubServer, repo: str, out: Path, **extra: str) -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.endpoint, "STORAGE_URI": f"hf://{repo}", "OUTPUT_PATH": str(out)}
    return {**env, "ACCESS_TOKEN": HUB_TOKEN, **extra}


def test_server_ignoring_range(run: Runner, range_mode: HubServer, tmp_path: Path) -> None:
    """A 200 with the whole file is not an error: that file is streamed whole, and so is every later large
    file from that host, without another ranged request; said once."""
    hub = range_mode
    files = {
        "a.safetensors": os.urandom(900 * KiB),  # 4 parts of 256 KiB
        "b.safetensors": os.urandom(700 * KiB),
        "config.json": b"{}",
    }
    hub.add_repo("org/no-ranges", files)
    hub.range_mode = "ignore"
    hub.reset_log()
    out = tmp_path / "out"
    result = run("model", **hub_env(hub, "org/no-ranges", out, INIT_CONCURRENCY="1"))
    assert result.returncode == 0, result.stderr
    assert tree(out) == files
    assert result.stdout.count("ignores Range requests") == 1, result.stdout
    gets = [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    ranged = [r for r in gets if r.range]
    assert len(ranged) == 1  # the first part of the first large file; then one stream per file
    assert len(gets) == 4  # that part, a.safetensors whole, b.safetensors whole, config.json
    assert not (out / ".initializer/partial").exists()


def test_range_answered_with_a_bare_200(run: Runner, range_mode: HubServer, tmp_path: Path) -> None:
    """A 200 that is neither the range (it has no Content-Range) nor the whole file: one line naming the
    server's behaviour, without retrying in vain."""
    hub = range_mode
    hub.add_repo("org/bare-200", {"w.safetensors": os.urandom(600 * KiB)})
    hub.range_mode = "bare"
    out = tmp_path / "out"
    result = run("model", **hub_env(hub, "org/bare-200", out))
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "HTTP 200" in line and "mishandles Range requests" in line and "INIT_PART_SIZE" in line
    assert "retry" not in result.stdout
    assert not (out / "w.safetensors").exists() and not (out / ".initializer/manifest.json").exists()


def test_wrong_content_range_is_refused(run: Runner, range_mode: HubServer, tmp_path: Path) -> None:
    """A 206 carrying other bytes than asked (its Content-Range says so) is never written into the file."""
    hub = range_mode
    hub.add_repo("org/shifted", {"w.safetensors": os.urandom(600 * KiB)})
    hub.range_mode = "shift"
    out = tmp_path / "out"
    result = run("model", **hub_env(hub, "org/shifted", out, INIT_MAX_ATTEMPTS="2"))
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "still failing after 2 attempts" in line and "with Content-Range 'bytes " in line
    assert "mismatch" not in line


def _journal_parts(out: Path, path: str) -> set[int]:
    journal = out / ".initializer/journal.jsonl"
    if not journal.exists():
        return set()
    records = [json.loads(line) for line in journal.read_text().splitlines()[1:] if line.strip()]
    return {r["part"] for r in records if r.get("path") == path and "part" in r}


def test_resume_when_the_server_now_ignores_range(
    run: Runner, range_mode: HubServer, hub_proxy: FaultProxy, tmp_path: Path
) -> None:
    """kill -9 with part of a large file written; the rerun meets a server that ignores Range (a mirror
    took over): it fetches that file whole and the bytes are right."""
    hub = range_mode
    files = {"big.safetensors": os.urandom(1536 * KiB), "config.json": b"{}"}  # 6 parts
    hub.add_repo("org/resume-no-ranges", files)
    hub_proxy.add(FaultRule(stall=60, times=100, skip=2, match="big.safetensors"))
    out = tmp_path / "out"
    env = {**hub_env(hub, "org/resume-no-ranges", out), "HF_ENDPOINT": hub_proxy.endpoint}
    proc = run.popen("model", **env)
    try:
        deadline = time.monotonic() + 60
        while len(_journal_parts(out, "big.safetensors")) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        assert len(_journal_parts(out, "big.safetensors")) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (out / "big.safetensors").exists()

    hub_proxy.clear()
    hub.range_mode = "ignore"
    result = run("model", **env)
    assert result.returncode == 0, result.stderr
    assert "of partial files already fetched" in result.stdout  # the parts were found...
    assert "ignores Range requests" in result.stdout  # ...but could not be resumed part by part
    assert tree(out) == files
