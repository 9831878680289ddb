"""Export to S3 on two servers (moto, `rclone serve s3`), through a fault proxy: verified multipart uploads,
the manifest last, a rerun that uploads nothing, `kill -9` mid-upload then resume, a destination that
fails half-way (nothing looks complete), bodies damaged on the way, caught by the store (the proxy
verifying CRC32s as AWS does) or by the ETag check (the servers alone check nothing), and HTTPS."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.fixtures import MOTO_ONLY
from tests.support.s3_server import S3Server
from tests.support.tls import make_certificates

from .conftest import Exporter, one_error_line, write_run

MANIFEST = ".model-exporter/manifest.json"


def _bucket(s3: S3Server) -> str:
    name = f"exp-{uuid.uuid4().hex[:10]}"
    s3.client().create_bucket(Bucket=name)
    return name


def _env(s3: S3Server, proxy: FaultProxy, uri: str, source: Path, **extra: str) -> dict[str, str]:
    return {**s3.env(), "ENDPOINT": proxy.endpoint, "STORAGE_URI": uri, "SOURCE_PATH": str(source), **extra}


def _objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed
    }


def _same_bytes(
    s3: S3Server, bucket: str, prefix: str, out: Path, name: str = "adapter_model.safetensors"
) -> bool:
    """Whether the object `prefix/name` holds the run's adapter file `name`."""
    got = s3.client().get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
    return got == (out / "adapter" / name).read_bytes()


def _part_puts(proxy: FaultProxy, key: str) -> int:
    return sum(1 for r in proxy.requests if r.method == "PUT" and r.path.endswith(key) and r.status == 200)


def test_export_adapter_then_rerun_uploads_nothing(
    s3: S3Server, s3_proxy: FaultProxy, export: Exporter, tmp_path: Path
) -> None:
    out = write_run(tmp_path)
    bucket = _bucket(s3)
    env = _env(s3, s3_proxy, f"s3://{bucket}/runs/r1", out)
    s3_proxy.fail(503, times=2, match="adapter_model")  # retried
    done = export(**env)
    assert done.returncode == 0, done.stderr
    objects = _objects(s3, bucket, "runs/r1/")
    assert set(objects) == {"adapter_model.safetensors", "adapter_config.json", MANIFEST}
    weights = "adapter_model.safetensors"
    assert objects[weights] == (out / "adapter" / weights).read_bytes()
    manifest = json.loads(objects[MANIFEST])
    assert manifest["run"]["base_model"] == "hf://acme/base-1b"
    assert manifest["run"]["final_loss"] == 1.25
    entry = next(f for f in manifest["files"] if f["path"] == weights)
    assert entry["size"] == 1_300_000
    if s3.multipart_etags:  # 1.3 MB in 256 KiB parts: S3's multipart ETag, checked by the exporter
        assert entry["etag"].endswith("-5")
    # The manifest went last: after every object's PUT and the multipart completion.
    writes = [r.path for r in s3_proxy.requests if r.method in ("PUT", "POST") and r.status == 200]
    assert writes[-1].endswith(MANIFEST)
    assert s3.secret_access_key not in done.stdout + done.stderr

    s3_proxy.reset_log()
    again = export(**env)
    assert again.returncode == 0, again.stderr
    assert "2 files already at" in again.stdout
    puts = [r.path for r in s3_proxy.requests if r.method == "PUT"]
    assert puts == [f"/{bucket}/runs/r1/{MANIFEST}"]


def test_kill_mid_upload_then_resume(
    s3: S3Server, s3_proxy: FaultProxy, export: Exporter, tmp_path: Path
) -> None:
    out = write_run(tmp_path, adapter_bytes=16 * 256 * 1024)  # 16 parts
    bucket = _bucket(s3)
    key = "r2/adapter_model.safetensors"
    env = _env(s3, s3_proxy, f"s3://{bucket}/r2", out, INIT_CONCURRENCY="2")
    # After 6 parts, every upload to the key hangs: the process is killed with parts on the server.
    s3_proxy.add(FaultRule(delay=60, skip=6, times=100, match=key, method="PUT"))
    proc = export.popen(**env)
    deadline = time.monotonic() + 60
    while _part_puts(s3_proxy, key) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _part_puts(s3_proxy, key) >= 6
    client = s3.client()
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="r2/adapter_model")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=f"r2/{MANIFEST}")  # not complete

    s3_proxy.clear()
    s3_proxy.reset_log()
    done = export(**env)
    assert done.returncode == 0, done.stderr
    assert "resuming the unfinished upload" in done.stdout
    assert _part_puts(s3_proxy, key) <= 10  # the 6 (or more) parts on the server were kept
    data = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"r2/{MANIFEST}")["Body"].read())
    assert {f["path"] for f in manifest["files"]} == {"adapter_model.safetensors", "adapter_config.json"}
    if s3.multipart_etags:
        digests = b"".join(hashlib.md5(data[i : i + 262144]).digest() for i in range(0, len(data), 262144))
        assert manifest["files"][1]["etag"] == f"{hashlib.md5(digests).hexdigest()}-16"


def test_destination_failing_half_way_leaves_nothing_complete(
    s3: S3Server, s3_proxy: FaultProxy, export: Exporter, tmp_path: Path
) -> None:
    out = write_run(tmp_path, adapter_bytes=8 * 256 * 1024, model=True)
    bucket = _bucket(s3)
    # A previous complete export is there: its manifest must go before anything is overwritten.
    s3.client().put_object(Bucket=bucket, Key=f"r3/{MANIFEST}", Body=b"{}")
    s3_proxy.add(FaultRule(status=500, skip=4, times=1000, match="/r3/", method="PUT"))
    done = export(**_env(s3, s3_proxy, f"s3://{bucket}/r3", out, EXPORT="all", INIT_MAX_ATTEMPTS="2"))
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert "still failing after 2 attempts" in line
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="r3/").get("Contents", [])
    keys = {o["Key"] for o in listed}
    assert f"r3/{MANIFEST}" not in keys
    assert "r3/model/model.safetensors" not in keys  # its multipart upload was never completed


@pytest.mark.parametrize("store_verifies", [True, False], ids=["store-checks-crc32", "etag-check"])
def test_body_damaged_on_the_way_is_sent_again(
    s3: S3Server, s3_proxy: FaultProxy, export: Exporter, tmp_path: Path, store_verifies: bool
) -> None:
    out = write_run(tmp_path, adapter_bytes=4 * 256 * 1024 + 1000)  # 5 parts
    bucket = _bucket(s3)
    s3_proxy.verify_checksums = store_verifies
    # A part and a small file, each damaged once on the way to the store.
    s3_proxy.add(FaultRule(corrupt=1000, skip=2, times=1, match="adapter_model", method="PUT"))
    s3_proxy.add(FaultRule(corrupt=3, times=1, match="adapter_config", method="PUT"))
    # One worker: the damaged part's retry comes after the parts before it, which is when rclone (streaming
    # each part on once those before it are in) has taken it and cannot replace it.
    env = _env(s3, s3_proxy, f"s3://{bucket}/r4", out, INIT_CONCURRENCY="1")
    try:
        done = export(**env)
    finally:
        s3_proxy.verify_checksums = False
    log = done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    # rclone cannot replace a part it has taken: the file's upload starts over, in this run; S3 (moto, or
    # the proxy refusing the damaged body) replaces the part under its number.
    restarted = s3.kind == "rclone" and not store_verifies
    assert log.count("the file's upload starts over") == restarted, log
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")  # the left one aborted
    assert s3_proxy.pending() == 0  # both faults were used
    if store_verifies:
        assert "it verifies x-amz-checksum-crc32" in log
        assert log.count("BadDigest") == 2
    else:
        assert "every ETag it answers is checked against the MD5" in log
        assert log.count("the store received something else") == 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert _same_bytes(s3, bucket, "r4", out, name)


@MOTO_ONLY  # about our TLS client (bodies sent in blocks, unsigned, CRC32 checked), not the store
def test_export_over_https_to_a_store_that_checks_crc32(
    s3: S3Server, export: Exporter, tmp_path: Path
) -> None:
    out = write_run(tmp_path, adapter_bytes=3 * 256 * 1024 + 5)
    bucket = _bucket(s3)
    ca, cert, key = make_certificates(tmp_path / "tls")
    with FaultProxy(s3.endpoint).serve_tls(cert, key).start() as proxy:
        proxy.verify_checksums = True
        proxy.add(FaultRule(corrupt=10, skip=1, times=1, match="adapter_model", method="PUT"))
        env = {**_env(s3, proxy, f"s3://{bucket}/r5", out), "AWS_CA_BUNDLE": str(ca)}
        done = export(**env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert proxy.pending() == 0 and "BadDigest" in done.stdout  # damaged, refused, sent again
        assert "it verifies x-amz-checksum-crc32" in done.stdout and "plain HTTP" not in done.stdout
    assert _same_bytes(s3, bucket, "r5", out)


@MOTO_ONLY  # about our client's route, not the store
def test_export_through_an_http_proxy(
    s3: S3Server, s3_proxy: FaultProxy, export: Exporter, tmp_path: Path
) -> None:
    """HTTP_PROXY carries the object PUTs (their bodies read in blocks) as it carries botocore's calls."""
    out = write_run(tmp_path, adapter_bytes=2 * 256 * 1024 + 7)
    bucket = _bucket(s3)
    env = _env(s3, s3_proxy, f"s3://{bucket}/r6", out, HTTP_PROXY=s3_proxy.endpoint)
    done = export(**{**env, "ENDPOINT": s3.endpoint})  # the server itself, reached through the proxy
    assert done.returncode == 0, done.stdout + done.stderr
    parts = [r for r in s3_proxy.requests if r.method == "PUT" and "adapter_model" in r.path]
    assert len(parts) == 3 and all(r.forward for r in s3_proxy.requests)
    assert _same_bytes(s3, bucket, "r6", out)


@MOTO_ONLY  # about our client's fallback, not the store
def test_store_refusing_checksum_headers_gets_none(
    s3: S3Server, s3_proxy: FaultProxy, export: Exporter, tmp_path: Path
) -> None:
    """A store that refuses x-amz-checksum-* whatever its value gets none; the ETags are checked instead."""
    out = write_run(tmp_path, adapter_bytes=2 * 256 * 1024 + 9)
    bucket = _bucket(s3)
    s3_proxy.refuse_checksums = True
    s3_proxy.add(FaultRule(corrupt=5, times=1, match="adapter_model", method="PUT"))
    try:
        done = export(**_env(s3, s3_proxy, f"s3://{bucket}/r7", out))
    finally:
        s3_proxy.refuse_checksums = False
    assert done.returncode == 0, done.stdout + done.stderr
    assert "it verifies no checksum" in done.stdout and "the store received something else" in done.stdout
    assert _same_bytes(s3, bucket, "r7", out)
