"""The test servers' command lines, as other helpers (containers, the demo) use them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.initializers.conftest import REPO


@contextmanager
def serve(*args: str) -> Iterator[str]:
    """Start `python -m tests.support.<args>`, yield the endpoint from its JSON ready line, then stop it."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield json.loads(proc.stdout.readline())["endpoint"]
    finally:
        proc.terminate()
        proc.wait(10)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_hub_and_proxy_command_lines(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "datasets" / "org" / "data" / "main"
    repo.mkdir(parents=True)
    (repo / "train.jsonl").write_text('{"text": "hi"}\n')
    with serve("tests.support.hub_server", "--root", str(tmp_path / "hub"), "--token", "t0ken") as hub:
        status, body = get(f"{hub}/api/datasets/org/data")
        assert status == 200 and json.loads(body)["siblings"] == [{"rfilename": "train.jsonl"}]
        assert get(f"{hub}/datasets/org/data/resolve/main/train.jsonl") == (200, b'{"text": "hi"}\n')
        assert get(f"{hub}/api/datasets/org/missing")[0] == 401
        with serve("tests.support.fault_proxy", "--upstream", hub, "--fault", "status=503,times=1") as proxy:
            assert get(f"{proxy}/api/datasets/org/data")[0] == 503
            assert get(f"{proxy}/api/datasets/org/data")[0] == 200
            log = json.loads(get(f"{proxy}/_proxy/requests")[1])
            assert [r["status"] for r in log] == [503, 200]
