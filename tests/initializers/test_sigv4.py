"""Our SigV4 signer (object GETs, the exporter's PUTs) gives the same headers as botocore's S3SigV4Auth,
byte for byte."""

from __future__ import annotations

import calendar
import hashlib
import time
from urllib.parse import quote

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from pkg.initializers.sources.sigv4 import UNSIGNED_PAYLOAD, sign

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


def _botocore(
    url: str, headers: dict[str, str], token: str | None, region: str, method: str = "GET", body: bytes = b""
) -> dict[str, str]:
    request = botocore.awsrequest.AWSRequest(method, url, headers=headers, data=body)
    if body:  # an upload with a checksum header: over TLS botocore leaves the body unsigned, as we do
        request.context["has_streaming_input"] = True
        request.context["checksum"] = {"request_algorithm": {"in": "header", "name": "x-amz-checksum-crc32"}}
    keys = botocore.credentials.Credentials("AKIAEXAMPLE", "wJalr/XUtnFEMI+K7MDENG", token)
    botocore.auth.S3SigV4Auth(keys, "s3", region).add_auth(request)
    return dict(request.headers.items())


KEYS = ["plain.bin", "a b/c+d=e&f.json", "ünïcødé/ファイル.txt", "x%y/~tilde/(paren)!*'", "dir//double"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(
    "base",
    [
        "https://bucket.s3.eu-west-1.store.invalid",
        "http://127.0.0.1:9000/bucket",
        "https://minio.example:443/data",
        "http://[::1]:9000/data",
    ],
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//token=="])
def test_same_signature_as_botocore(key: str, base: str, token: str | None) -> None:
    url = f"{base}/{quote(key, safe='/~')}"
    headers = {"Range": "bytes=0-1023", "If-Match": '"0123456789abcdef0123456789abcdef"'}
    theirs = _botocore(url, headers, token, "eu-west-1")
    stamp = theirs["X-Amz-Date"]
    now = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    ours = sign(url, headers, "AKIAEXAMPLE", "wJalr/XUtnFEMI+K7MDENG", token, "eu-west-1", now=now)
    assert ours["Authorization"] == theirs["Authorization"]
    for name in ("X-Amz-Date", "X-Amz-Content-SHA256", "Range", "If-Match"):
        assert ours[name] == theirs[name]
    assert ours.get("X-Amz-Security-Token") == theirs.get("X-Amz-Security-Token")


def test_query_string_is_canonical() -> None:
    """A versioned GET (`?versionId=`) signs the query too, as botocore does."""
    url = "https://b.s3.store.invalid/k?x=&versionId=a%20b%2Fc"
    theirs = _botocore(url, {}, None, "us-east-1")
    now = calendar.timegm(time.strptime(theirs["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    ours = sign(url, {}, "AKIAEXAMPLE", "wJalr/XUtnFEMI+K7MDENG", None, "us-east-1", now=now)
    assert ours["Authorization"] == theirs["Authorization"]


@pytest.mark.parametrize("secure", [True, False])
def test_put_with_payload_hash_and_query(secure: bool) -> None:
    """An upload part: PUT with a query, a checksum header and the body's SHA-256 (or, over TLS, none)."""
    body = b"part bytes" * 100
    base = "https://b.s3.store.invalid" if secure else "http://127.0.0.1:9000/b"
    url = f"{base}/dir/model-00001-of-00002.safetensors?partNumber=3&uploadId=a%2Bb"
    headers = {"Content-Length": str(len(body)), "x-amz-checksum-crc32": "AAAAAA=="}
    payload = UNSIGNED_PAYLOAD if secure else hashlib.sha256(body).hexdigest()
    theirs = _botocore(url, headers, None, "eu-west-1", "PUT", body)
    now = calendar.timegm(time.strptime(theirs["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    ours = sign(
        url, headers, "AKIAEXAMPLE", "wJalr/XUtnFEMI+K7MDENG", None, "eu-west-1", now=now, method="PUT",
        payload_hash=payload,
    )  # fmt: skip
    assert ours["X-Amz-Content-SHA256"] == theirs["X-Amz-Content-SHA256"] == payload
    assert ours["Authorization"] == theirs["Authorization"]
