"""S3 end to end: the real entry points against moto over HTTP (credentials enforced), through a proxy
that counts requests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pkg.initializers.config import load_config
from pkg.initializers.errors import InitializerError
from pkg.initializers.sources import RemoteFile, open_source
from pkg.initializers.sources.s3 import S3Source
from tests.initializers.conftest import MOTO_ONLY, Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.s3_server import S3Server

KiB = 1024


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> dict[str, bytes]:
    """A bucket with many small files, multi-part-sized objects, an empty object and awkward names."""
    objects = {f"set/small/{i:03d}.jsonl": os.urandom(1000 + i) for i in range(60)}
    objects["set/large.bin"] = os.urandom(1100 * KiB)  # 5 parts of 256 KiB, single-part MD5 ETag
    objects["set/empty.txt"] = b""
    objects["set/naïve dir/ünïcode file.txt"] = "grüße".encode()
    objects["set/with space.txt"] = b"spaces"
    client = s3.fill("data", objects)
    # Multipart uploads: their ETag is the MD5 of the parts' MD5s. Uploaders use one part size but for the
    # last part, as here; the second has parts of different sizes, so its part sizes must be asked for.
    sizes = [5 * 1024 * KiB, 300 * KiB]
    objects["set/multipart.bin"] = upload_parts(client, "data", "set/multipart.bin", sizes)
    objects["set/uneven-parts.bin"] = upload_parts(
        client, "data", "set/uneven-parts.bin", [5 * 1024 * KiB, 6 * 1024 * KiB, 1000]
    )
    client.put_object(Bucket="data", Key="other/x.txt", Body=b"not under set/")
    client.put_object(Bucket="data", Key="setx/y.txt", Body=b"a sibling prefix, not the folder")
    if s3.kind == "moto":  # rclone stores a folder marker as an empty folder, and lists it as an object
        client.put_object(Bucket="data", Key="set/folder-marker/", Body=b"")
    return {k.removeprefix("set/"): v for k, v in objects.items()}


def upload_parts(client: Any, bucket: str, key: str, sizes: list[int]) -> bytes:
    """A multipart upload of random parts of these sizes; returns the object's bytes."""
    chunks = [os.urandom(n) for n in sizes]
    up = client.create_multipart_upload(Bucket=bucket, Key=key)
    parts = [
        {
            "PartNumber": n,
            "ETag": client.upload_part(Bucket=bucket, Key=key, PartNumber=n, UploadId=up["UploadId"], Body=c)[
                "ETag"
            ],
        }
        for n, c in enumerate(chunks, 1)
    ]
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    return b"".join(chunks)


def s3_env(s3: S3Server, proxy: FaultProxy, uri: str, out: Path, **extra: str) -> dict[str, str]:
    return {**s3.env(), "ENDPOINT": proxy.endpoint, "STORAGE_URI": uri, "OUTPUT_PATH": str(out), **extra}


def test_download_prefix(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    s3_proxy.stall(1.5, match="/data/set/small/000")  # outlast INIT_PROGRESS_INTERVAL: a progress line
    result = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set", out))
    assert result.returncode == 0, result.stderr
    assert tree(out) == bucket
    assert "done: " in result.stdout and "progress: " in result.stdout
    marker = json.loads((out / ".initializer/manifest.json").read_text())
    assert marker["total_files"] == len(bucket)
    assert marker["request"]["storage_uri"] == "s3://data/set"
    by_path = {f["path"]: f for f in marker["files"]}
    assert by_path["large.bin"]["md5"] == hashlib.md5(bucket["large.bin"]).hexdigest()
    if s3.multipart_etags:
        assert "md5" not in by_path["multipart.bin"]
        assert by_path["multipart.bin"]["md5_of_parts"].endswith("-2")
        assert by_path["uneven-parts.bin"]["md5_of_parts"].endswith("-3")
    else:  # rclone keeps a multipart upload as one file, with its plain MD5 as ETag
        assert by_path["multipart.bin"]["md5"] == hashlib.md5(bucket["multipart.bin"]).hexdigest()
    assert not (out / ".initializer/partial").exists() or not any((out / ".initializer/partial").iterdir())
    assert s3_proxy.count("/data/set/large.bin") == 5  # ranged parts
    secret = s3.secret_access_key
    assert secret not in result.stdout + result.stderr
    assert secret not in (out / ".initializer/manifest.json").read_text()

    # A rerun with a valid marker exits 0 at once, without touching the store.
    s3_proxy.reset_log()
    again = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set", out))
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert s3_proxy.requests == []

    # A file removed from the output invalidates the marker: only that file is fetched again.
    (out / "small/007.jsonl").unlink()
    third = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set", out))
    assert third.returncode == 0, third.stderr
    assert tree(out) == bucket
    gets = [r.path for r in s3_proxy.requests if r.method == "GET" and r.path != "/data"]
    assert gets == ["/data/set/small/007.jsonl"]


def test_through_an_http_proxy(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path
) -> None:
    """HTTP_PROXY carries listing and object GETs alike, with the proxy's login sent and never printed;
    NO_PROXY sends them direct."""
    out = tmp_path / "out"
    password = "proxy-pa55-word"
    proxy = s3_proxy.endpoint.replace("http://", f"http://puser:{password}@")
    env = {**s3.env(), "STORAGE_URI": "s3://data/set/small", "OUTPUT_PATH": str(out), "HTTP_PROXY": proxy}
    result = run("dataset", **env)
    assert result.returncode == 0, result.stderr
    assert tree(out) == {k.removeprefix("small/"): v for k, v in bucket.items() if k.startswith("small/")}
    objects = [r for r in s3_proxy.requests if r.path.startswith("/data/set/small/")]
    assert len(objects) == 60
    assert all(r.forward and r.proxy_user == "puser" for r in s3_proxy.requests)
    assert password not in result.stdout + result.stderr

    s3_proxy.reset_log()
    direct = run("dataset", **{**env, "OUTPUT_PATH": str(tmp_path / "direct"), "NO_PROXY": "127.0.0.1"})
    assert direct.returncode == 0, direct.stderr
    assert s3_proxy.requests == []


def test_patterns_and_single_object(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path
):
    out = tmp_path / "out"
    result = run(
        "model",
        **s3_env(
            s3, s3_proxy, "s3://data/set/", out, ALLOW_PATTERNS="small/00*,*.txt", IGNORE_PATTERNS="empty.txt"
        ),
    )
    assert result.returncode == 0, result.stderr
    expected = {k: v for k, v in bucket.items() if (k.startswith("small/00") or k.endswith(".txt"))}
    expected.pop("empty.txt")
    assert tree(out) == expected

    single = tmp_path / "single"
    result = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set/with space.txt", single))
    assert result.returncode == 0, result.stderr
    assert tree(single) == {"with space.txt": b"spaces"}


def test_multipart_etag_mismatch_is_refused(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path
) -> None:
    """One flipped byte in a multipart object fails its ETag check; nothing is left looking complete."""
    out = tmp_path / "out"
    s3_proxy.add(FaultRule(corrupt=1000, match="/data/set/uneven-parts.bin"))
    result = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set/uneven-parts.bin", out))
    assert result.returncode != 0
    expected = "does not match its multipart ETag" if s3.multipart_etags else "md5 mismatch after download"
    assert expected in one_error_line(result.stderr)
    assert not (out / "uneven-parts.bin").exists() and not (out / ".initializer/manifest.json").exists()
    again = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set/uneven-parts.bin", out))
    assert again.returncode == 0, again.stderr
    assert tree(out) == {"uneven-parts.bin": bucket["uneven-parts.bin"]}


@MOTO_ONLY  # rclone stores keys as file paths: it cannot hold "p/../escaped.txt"
def test_traversal_key_refused(run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path) -> None:
    client = s3.client()
    client.create_bucket(Bucket="evil")
    client.put_object(Bucket="evil", Key="p/ok.txt", Body=b"ok")
    client.put_object(Bucket="evil", Key="p/../escaped.txt", Body=b"pwned")
    out = tmp_path / "nested" / "out"
    result = run("dataset", **s3_env(s3, s3_proxy, "s3://evil/p", out))
    assert result.returncode != 0
    assert "refusing" in one_error_line(result.stderr) and "escaped.txt" in result.stderr
    assert not (tmp_path / "nested" / "escaped.txt").exists()
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    assert not (out / ".initializer/manifest.json").exists()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://data/no-such-prefix", "nothing to download"),
        ("s3://no-such-bucket/x", "does not exist"),
    ],
)
def test_clear_errors(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path, uri: str, message: str
) -> None:
    result = run("dataset", **s3_env(s3, s3_proxy, uri, tmp_path / "out"))
    assert result.returncode == 1
    assert message in one_error_line(result.stderr)


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_wrong_credentials(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path, wrong: str
) -> None:
    bad_secret = "WrongSecretKeyThatMustNotAppear+12345"
    env = s3_env(s3, s3_proxy, "s3://data/set", tmp_path / "out", SECRET_ACCESS_KEY=bad_secret)
    if wrong == "key":
        env["ACCESS_KEY_ID"] = "AKIAUNKNOWNKEY000000"
    result = run("dataset", **env)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert ("SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId") in line
    assert "ACCESS_KEY_ID" in line
    assert bad_secret not in result.stdout + result.stderr
    assert not (tmp_path / "out" / ".initializer/manifest.json").exists()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["a//b.txt", "a/b.txt"], "same path"),  # two keys, one normalised path
        (["a", "a/b"], "both a file and a folder"),  # a file and a folder of one name
    ],
)
@MOTO_ONLY  # a filesystem (rclone's store) cannot hold these pairs of keys
def test_colliding_keys(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path, keys: list[str], message: str
) -> None:
    bucket = f"collide-{len(keys[0])}"
    s3.fill(bucket, dict.fromkeys(keys, b"x"), prefix="p/")
    result = run("dataset", **s3_env(s3, s3_proxy, f"s3://{bucket}/p", tmp_path / "out"))
    assert result.returncode == 1
    assert message in one_error_line(result.stderr)


@MOTO_ONLY  # IAM and STS
def test_role_arn_assumed_through_sts(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """ROLE_ARN: the base keys only assume the role; the role's temporary credentials read the bucket."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        region_name=s3.region,
    )
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    role = iam.create_role(RoleName="reader", AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    iam.put_role_policy(
        RoleName="reader",
        PolicyName="read",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    client = s3.client()
    client.create_bucket(Bucket="role-data")
    client.put_object(Bucket="role-data", Key="d/x.txt", Body=b"via role")
    out = tmp_path / "out"
    result = run("dataset", **s3_env(s3, s3_proxy, "s3://role-data/d", out, ROLE_ARN=role["Arn"]))
    assert result.returncode == 0, result.stderr
    assert tree(out) == {"x.txt": b"via role"}
    assert s3.secret_access_key not in result.stdout + result.stderr
    assert [r.path for r in s3_proxy.requests if r.method == "POST"] == ["/"]  # the STS AssumeRole call


def test_refused_get_is_one_clear_line(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path
) -> None:
    """A GET refused after a successful listing (e.g. no s3:GetObject) maps to the same auth message."""
    s3_proxy.fail(403, times=1, match="/data/set/small/003")
    result = run("dataset", **s3_env(s3, s3_proxy, "s3://data/set", tmp_path / "out"))
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "S3 denied access to s3://data/set/small/003.jsonl" in line and "ACCESS_KEY_ID" in line


def _source(s3: S3Server, uri: str, **extra: str) -> S3Source:
    env = {**s3.env(), "STORAGE_URI": uri, "OUTPUT_PATH": "/nowhere", **extra}
    source = open_source(load_config("dataset", env))
    assert isinstance(source, S3Source)
    return source


def _read(source: S3Source, f: RemoteFile, start: int, end: int) -> bytes:
    with source.open_range(f, start, end) as chunks:
        return b"".join(chunks)


def test_ranged_reads_pinned_to_the_listed_version(s3: S3Server) -> None:
    """Ranged GETs carry If-Match on the listed ETag: a replaced object fails instead of mixing versions;
    a deleted one says so."""
    client = s3.client()
    client.create_bucket(Bucket="changing")
    first = os.urandom(300 * KiB)
    client.put_object(Bucket="changing", Key="d/obj.bin", Body=first)
    client.put_object(Bucket="changing", Key="d/gone.bin", Body=b"soon deleted")
    source = _source(s3, "s3://changing/d")
    files = {f.path: f for f in source.list_files()}
    obj = files["obj.bin"]
    assert _read(source, obj, 1000, 2000) == first[1000:2000]
    assert _read(source, obj, 0, obj.size) == first

    client.put_object(Bucket="changing", Key="d/obj.bin", Body=os.urandom(300 * KiB))
    with pytest.raises(InitializerError, match="changed during the download"):
        _read(source, obj, 1000, 2000)
    client.delete_object(Bucket="changing", Key="d/gone.bin")
    with pytest.raises(InitializerError, match="disappeared during the download"):
        _read(source, files["gone.bin"], 0, files["gone.bin"].size)
    source.close()


@pytest.mark.parametrize(
    ("bucket_name", "region", "endpoint", "base_url"),
    [
        ("my-bucket", "us-east-1", None, "https://my-bucket.s3.amazonaws.com"),
        ("my-bucket", "eu-west-1", None, "https://my-bucket.s3.eu-west-1.amazonaws.com"),
        ("my.dotted.bucket", "eu-west-1", None, "https://s3.eu-west-1.amazonaws.com/my.dotted.bucket"),
        ("data", "us-east-1", "http://minio.local:9000", "http://minio.local:9000/data"),
    ],
)
def test_object_urls_and_signatures(bucket_name: str, region: str, endpoint: str | None, base_url: str):
    """Object GETs use the URL botocore would (virtual-hosted on AWS, path style with ENDPOINT) and a SigV4
    signature over the Range and If-Match headers. No network: presigning and signing are local."""
    env = {"STORAGE_URI": f"s3://{bucket_name}/p", "OUTPUT_PATH": "/nowhere", "REGION": region}
    env |= {"ACCESS_KEY_ID": "AKIAEXAMPLE", "SECRET_ACCESS_KEY": "secret-example"}
    source = open_source(load_config("dataset", env | ({"ENDPOINT": endpoint} if endpoint else {})))
    assert isinstance(source, S3Source)
    assert source.base_url == base_url
    headers = source.sign(f"{base_url}/p/a%20b", {"Range": "bytes=0-9", "If-Match": '"etag"'})
    auth = headers["Authorization"]
    assert f"/{region}/s3/aws4_request" in auth and "SignedHeaders=host;if-match;range;" in auth
    assert "secret-example" not in str(headers)
    source.close()


@pytest.mark.parametrize(
    "where",
    [
        {"ENDPOINT": "{proxy}", "REGION": "us-west-2"},  # REGION set, but not the bucket's
        {"AWS_ENDPOINT_URL_S3": "{proxy}"},  # no REGION at all (boto3's default setup), no ENDPOINT
        {"AWS_ENDPOINT_URL_S3": "{proxy}", "unnamed": ""},  # and a listing that does not name the region
    ],
    ids=["wrong-region", "no-region", "asked-with-head-bucket"],
)
def test_bucket_in_another_region(
    run: Runner, s3: S3Server, s3_proxy: FaultProxy, bucket: dict, tmp_path: Path, where: dict
) -> None:
    """As on AWS, the bucket refuses requests signed for another region and names its own: the download
    follows it (as boto3, and so the upstream images, do) instead of failing on its first object."""
    env = {k: v for k, v in s3.env().items() if k not in ("ENDPOINT", "REGION")}
    env |= {k: v.format(proxy=s3_proxy.endpoint) for k, v in where.items() if k != "unnamed"}
    out = tmp_path / "out"
    s3_proxy.bucket_region, s3_proxy.region_in_listings = "eu-west-1", "unnamed" not in where
    try:
        result = run("dataset", **env, STORAGE_URI="s3://data/set/small", OUTPUT_PATH=str(out))
    finally:
        s3_proxy.bucket_region, s3_proxy.region_in_listings = None, True
    assert result.returncode == 0, result.stderr
    assert tree(out) == {k.removeprefix("small/"): v for k, v in bucket.items() if k.startswith("small/")}
    assert "bucket data is in region eu-west-1" in result.stdout
    refused = [r for r in s3_proxy.requests if r.status == 400]
    assert len(refused) == 1 and refused[0].path == "/data"  # only botocore's first listing call
    assert len([r for r in s3_proxy.requests if r.path.startswith("/data/set/small/")]) == 60
    heads = [r for r in s3_proxy.requests if r.method == "HEAD" and r.path == "/data"]
    assert len(heads) == (1 if "unnamed" in where else 0)


def test_region_from_aws_default_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without REGION, AWS_DEFAULT_REGION (set in EKS pods) picks the region, as with boto3. No network."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    env = {"STORAGE_URI": "s3://my-bucket/p", "OUTPUT_PATH": "/nowhere"}
    env |= {"ACCESS_KEY_ID": "AKIAEXAMPLE", "SECRET_ACCESS_KEY": "secret-example"}
    source = open_source(load_config("dataset", env))
    assert isinstance(source, S3Source)
    assert source.region == "eu-central-1"
    assert source.base_url == "https://my-bucket.s3.eu-central-1.amazonaws.com"
    source.close()
