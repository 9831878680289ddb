"""Downloads from hostile or broken servers and sources: bodies that trickle, stops during stalled reads,
FIFOs and unreadable files in a volume, encrypted S3 objects whose ETags are not MD5s, and the space a
failed run leaves behind."""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pkg.initializers.config import load_config
from pkg.initializers.errors import InitializerError
from pkg.initializers.sources import open_source
from tests.initializers.conftest import HUB_TOKEN, MOTO_ONLY, REPO, Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.fixtures import wait_until
from tests.support.hub_server import HubServer
from tests.support.s3_server import S3Server

KiB = 1024


def hub_env(proxy: FaultProxy, repo: str, out: Path, **extra: str) -> dict[str, str]:
    env = {"HF_ENDPOINT": proxy.endpoint, "STORAGE_URI": f"hf://{repo}", "OUTPUT_PATH": str(out)}
    return {**env, "ACCESS_TOKEN": HUB_TOKEN, **extra}


def test_trickling_body_times_out(run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path) -> None:
    """A body trickling a few bytes a second never lets a socket read time out; the minimum rate does,
    and the retry gets the file."""
    files = {"tokenizer.json": os.urandom(200 * KiB)}
    hub.add_repo("org/trickle", files)
    hub_proxy.trickle(0.05, match="tokenizer.json", after_bytes=10 * KiB)  # 20 bytes/s
    out = tmp_path / "out"
    result = run("model", timeout=60, **hub_env(hub_proxy, "org/trickle", out, INIT_READ_TIMEOUT="1"))
    assert result.returncode == 0, result.stderr
    assert tree(out) == files
    assert "the body arrives too slowly" in result.stdout and "retry 1/" in result.stdout


def test_sigterm_during_a_stalled_read(
    run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path
) -> None:
    """SIGTERM acts at once, not after INIT_READ_TIMEOUT (60 s here): reads in progress are aborted."""
    hub.add_repo("org/stalled", {"w.safetensors": os.urandom(600 * KiB)})
    hub_proxy.add(FaultRule(stall=300, stall_after=1000, times=100, match="w.safetensors"))
    out = tmp_path / "out"
    proc = run.popen("model", **hub_env(hub_proxy, "org/stalled", out, INIT_READ_TIMEOUT="60"))
    wait_until(lambda: hub_proxy.count("w.safetensors") >= 3, 60)  # its 3 parts are stalled
    time.sleep(0.3)  # the 1000 bytes before the stall have been read
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=20)  # a third of the read timeout: generous on a loaded machine
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("SIGTERM did not stop the run while its reads were stalled")
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["error: interrupted; rerun to resume (finished files are kept)"]


def _config(source: Path, out: Path) -> object:
    return load_config("dataset", {"STORAGE_URI": f"file://{source}", "OUTPUT_PATH": str(out)})


def test_fifo_swapped_in_does_not_block(tmp_path: Path) -> None:
    """A FIFO put in place of a listed file would block open() until a writer comes: refused at once."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "a.bin").write_bytes(b"x" * 100)
    source = open_source(_config(volume, tmp_path / "out"))  # type: ignore[arg-type]
    [listed] = source.list_files()
    (volume / "a.bin").unlink()
    os.mkfifo(volume / "a.bin")
    outcome: list[str] = []

    def read() -> None:
        try:
            with source.open_range(listed, 0, listed.size) as chunks:
                outcome.append(repr(b"".join(chunks)))
        except InitializerError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # unblock the reader with a writer that closes at once
        os.close(os.open(volume / "a.bin", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("open() of a FIFO blocked")
    assert outcome and "is no longer a regular file" in outcome[0]


def _without_root_file_access() -> None:
    """In the child: drop the capabilities that let root read any file (the tests run as root here)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_source_file_is_named_as_such(run: Runner, tmp_path: Path) -> None:
    """A file of the source volume that cannot be read is the source's problem, not OUTPUT_PATH's."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "ok.txt").write_bytes(b"ok")
    (volume / "locked.bin").write_bytes(b"secret")
    (volume / "locked.bin").chmod(0)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "pkg.initializers.dataset"],
        cwd=REPO,
        env=run.env({"STORAGE_URI": f"file://{volume}", "OUTPUT_PATH": str(out)}),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
    )
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert f"cannot read {volume / 'locked.bin'} from STORAGE_URI" in line and "Permission denied" in line
    assert "OUTPUT_PATH" not in line


@MOTO_ONLY  # the proxy rewrites moto's listing XML
@pytest.mark.parametrize(
    "encryption",
    [
        {"x-amz-server-side-encryption": "aws:kms"},
        {"x-amz-server-side-encryption-customer-algorithm": "AES256"},
    ],
    ids=["sse-kms", "sse-c"],
)
def test_encrypted_object_etag_is_not_an_md5(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path, encryption: dict[str, str]
) -> None:
    """SSE-KMS and SSE-C objects have 32-hex ETags that are not MD5s: verified by size, said once."""
    body = os.urandom(50 * KiB)
    bucket = "sse-" + next(iter(encryption)).rsplit("-", 1)[1]
    s3.fill(bucket, {"p/x.bin": body})
    real, fake = hashlib.md5(body).hexdigest(), "0123456789abcdef0123456789abcdef"
    s3_proxy.add(FaultRule(headers={"ETag": f'"{fake}"', **encryption}, times=100, match=f"/{bucket}/p/"))
    s3_proxy.add(FaultRule(replace=(real, fake), times=100, match=f"/{bucket}"))  # the listing
    out = tmp_path / "out"
    env = {**s3.env(), "ENDPOINT": s3_proxy.endpoint, "STORAGE_URI": f"s3://{bucket}/p"}
    result = run("dataset", **env, OUTPUT_PATH=str(out))
    assert result.returncode == 0, result.stderr
    assert tree(out) == {"x.bin": body}
    assert "the ETags of such objects are not MD5s" in result.stdout
    assert "retry" not in result.stdout


def test_failed_run_holds_only_what_it_fetched(
    run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The temporary file of a large download is sparse: a run that fails early does not hold the space of
    the whole file (56 GB seen with a preallocated one)."""
    size = 2048 * KiB  # 8 parts of 256 KiB
    hub.add_repo("org/fails", {"w.safetensors": os.urandom(size)})
    hub_proxy.add(FaultRule(status=403, times=100, skip=1, match="w.safetensors"))
    out = tmp_path / "out"
    result = run("model", **hub_env(hub_proxy, "org/fails", out))
    assert result.returncode == 1
    [partial] = (out / ".initializer/partial").iterdir()
    assert partial.stat().st_size == size
    assert partial.stat().st_blocks * 512 <= size // 4  # at most the one part that was let through
