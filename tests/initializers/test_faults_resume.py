"""Robustness: injected 5xx / 429 / dropped connections / stalls, and crash-resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.initializers.conftest import HUB_TOKEN, Runner, tree
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.fixtures import wait_until
from tests.support.hub_server import HubServer
from tests.support.s3_server import S3Server

KiB = 1024


@pytest.fixture(scope="module")
def flaky_bucket(s3: S3Server) -> dict[str, bytes]:
    objects = {f"small-{i:02d}.txt": os.urandom(2000 + i) for i in range(20)}
    objects["big-a.bin"] = os.urandom(1024 * KiB)
    objects["big-b.bin"] = os.urandom(900 * KiB)
    s3.fill("flaky", objects, prefix="f/")
    return objects


def env_for(s3: S3Server, proxy: FaultProxy, uri: str, out: Path, **extra: str) -> dict[str, str]:
    return {**s3.env(), "ENDPOINT": proxy.endpoint, "STORAGE_URI": uri, "OUTPUT_PATH": str(out), **extra}


def test_s3_survives_faults(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, flaky_bucket: dict, tmp_path: Path
):
    s3_proxy.add(FaultRule(status=503, times=1, match="/flaky", method="GET"))  # the listing itself
    s3_proxy.fail(500, times=3, match="small-0")
    s3_proxy.fail(503, times=2, match="big-a")
    s3_proxy.fail(429, times=2, match="small-1", retry_after=1)
    s3_proxy.drop(after_bytes=100 * KiB, times=3, match="big-b")
    s3_proxy.drop(after_bytes=500, times=2, match="small-05")
    out = tmp_path / "out"
    result = run("dataset", **env_for(s3, s3_proxy, "s3://flaky/f", out))
    assert result.returncode == 0, result.stderr
    assert tree(out) == flaky_bucket
    assert s3_proxy.pending() == 0
    summary = next(line for line in result.stdout.splitlines() if "done:" in line)
    assert "12 retries" in summary  # one per fault on a file; the listing retry is logged, not counted
    assert "Traceback" not in result.stderr


def test_stalled_read_times_out_and_retries(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, flaky_bucket: dict, tmp_path: Path
) -> None:
    s3_proxy.stall(30, times=1, match="big-b", after_bytes=10 * KiB)
    out = tmp_path / "out"
    result = run("dataset", **env_for(s3, s3_proxy, "s3://flaky/f", out, INIT_READ_TIMEOUT="1"))
    assert result.returncode == 0, result.stderr
    assert tree(out) == flaky_bucket
    assert "retry 1/" in result.stdout and "big-b" in result.stdout


def test_gives_up_with_one_line(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, flaky_bucket: dict, tmp_path: Path
):
    s3_proxy.fail(503, times=100, match="small-07")
    result = run("dataset", **env_for(s3, s3_proxy, "s3://flaky/f", tmp_path / "out", INIT_MAX_ATTEMPTS="3"))
    assert result.returncode == 1
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "still failing after 3 attempts" in err[0], result.stderr
    assert not (tmp_path / "out" / ".initializer/manifest.json").exists()


def test_hub_survives_faults(run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path) -> None:
    files = {"config.json": b"{}", "model.safetensors": os.urandom(600 * KiB), "tokenizer.json": b"t" * 5000}
    hub.add_repo("org/flaky-model", files)
    hub_proxy.fail(502, times=1, match="/api/models/")
    hub_proxy.fail(429, times=2, match="/resolve/", retry_after=1)
    hub_proxy.drop(after_bytes=50 * KiB, times=2, match="model.safetensors")
    out = tmp_path / "out"
    env = {"HF_ENDPOINT": hub_proxy.endpoint, "STORAGE_URI": "hf://org/flaky-model", "OUTPUT_PATH": str(out)}
    result = run("model", ACCESS_TOKEN=HUB_TOKEN, **env)
    assert result.returncode == 0, result.stderr
    assert tree(out) == files
    assert hub_proxy.pending() == 0
    assert HUB_TOKEN not in result.stdout + result.stderr


def _journal(out: Path) -> list[dict]:
    path = out / ".initializer/journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip()]


def test_crash_resume(run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path) -> None:
    """SIGKILL mid-download; the rerun fetches only the missing parts and files, and the bytes are right."""
    objects = {f"small-{i}.txt": os.urandom(3000) for i in range(8)}
    objects["a-big.bin"] = os.urandom(2048 * KiB)  # 8 parts of 256 KiB
    objects["z-big.bin"] = os.urandom(4096 * KiB)  # 16 parts
    s3.fill("resume", objects, prefix="m/")
    # Let 4 parts of z-big through, stall every later one, so the process is caught mid-file.
    s3_proxy.add(FaultRule(stall=60, times=100, skip=4, match="z-big.bin"))
    out = tmp_path / "out"
    env = env_for(s3, s3_proxy, "s3://resume/m", out, INIT_CONCURRENCY="16")
    proc = run.popen("dataset", **env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            records = _journal(out)
            whole = {r["path"] for r in records if "part" not in r}
            z_parts = {r["part"] for r in records if r.get("path") == "z-big.bin" and "part" in r}
            if len(whole) == 9 and len(z_parts) == 4:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail(f"download did not reach the expected state: {_journal(out)}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (out / "z-big.bin").exists()
    assert not (out / ".initializer/manifest.json").exists()

    s3_proxy.clear()
    s3_proxy.reset_log()
    result = run("dataset", **env)
    assert result.returncode == 0, result.stderr
    assert tree(out) == objects
    assert "resuming: 9 files already complete" in result.stdout
    gets = [r for r in s3_proxy.requests if r.method == "GET" and r.path.startswith("/resume/m/")]
    assert {r.path for r in gets} == {"/resume/m/z-big.bin"}
    assert len(gets) == 12  # the 12 parts that were not finished
    starts = {int(r.range.split("=")[1].split("-")[0]) // (256 * KiB) for r in gets}
    assert starts == set(range(16)) - z_parts  # exactly the parts the journal did not record


def test_sigterm_stops_cleanly(run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path) -> None:
    """Kubernetes stops a pod with SIGTERM: one line, exit 143, nothing marked complete, rerun resumes."""
    objects = {f"small-{i}.txt": os.urandom(1000) for i in range(4)}
    objects["big.bin"] = os.urandom(1024 * KiB)
    s3.fill("term", objects, prefix="t/")
    s3_proxy.add(FaultRule(stall=2, stall_after=1000, times=100, match="big.bin"))
    out = tmp_path / "out"
    env = env_for(s3, s3_proxy, "s3://term/t", out)
    proc = run.popen("dataset", **env)
    wait_until(lambda: len({r["path"] for r in _journal(out) if "part" not in r}) >= 4, 60)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["error: interrupted; rerun to resume (finished files are kept)"]
    assert not (out / ".initializer/manifest.json").exists()
    s3_proxy.clear()
    result = run("dataset", **env)
    assert result.returncode == 0, result.stderr
    assert tree(out) == objects
    assert "resuming: 4 files already complete" in result.stdout


def test_concurrent_runs_wait_for_each_other(run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path):
    """Two initializers on one OUTPUT_PATH: the second waits for the first's lock, then finds it complete."""
    objects = {"a.txt": b"a", "b.bin": os.urandom(300 * KiB)}
    s3.fill("twice", objects, prefix="p/")
    # Long enough for the second run to start and list on a loaded machine (under INIT_READ_TIMEOUT=10).
    s3_proxy.add(FaultRule(stall=8, stall_after=1000, times=1, match="b.bin"))
    out = tmp_path / "out"
    env = env_for(s3, s3_proxy, "s3://twice/p", out)
    first = run.popen("dataset", **env)
    wait_until((out / ".initializer/journal.jsonl").exists, 30)
    second = run("dataset", **env)
    _, first_err = first.communicate(timeout=60)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second.stderr
    assert "waiting for it" in second.stdout and "completed by another run" in second.stdout
    assert tree(out) == objects
    assert s3_proxy.count("/twice/p/b.bin") == 2  # its two 256 KiB parts, fetched once, by the first run
