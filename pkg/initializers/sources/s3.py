"""S3 source (AWS and every S3-compatible store through ENDPOINT: MinIO, Ceph, GCS interop).

Credentials: ACCESS_KEY_ID / SECRET_ACCESS_KEY, else the default AWS chain (IRSA, instance profile);
ROLE_ARN is assumed through STS. Ranged GETs carry If-Match on the ETag, so an object replaced mid-download
fails instead of mixing versions. Single-part ETags are MD5s and get verified.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from ..config import Config
from ..errors import InitializerError, TransientError, one_line, parse_retry_after, register_secret
from ..uri import S3Uri
from .base import RemoteFile, Source

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "Forbidden",
    "403",
    "401",
}
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "503",
    "500",
}
CHUNK = 1024 * 1024


class S3Source(Source):
    def __init__(self, uri: S3Uri, config: Config):
        self.uri = uri
        self.config = config
        self.tuning = config.tuning
        session = boto3.session.Session(
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            region_name=config.region or "us-east-1",
        )
        boto_config = botocore.config.Config(
            max_pool_connections=config.tuning.concurrency + 4,
            connect_timeout=10,
            read_timeout=config.tuning.read_timeout,
            retries={"total_max_attempts": 1},  # the engine retries, with one policy for every source
            s3={"addressing_style": "path"} if config.endpoint else {},
            user_agent_extra="kubeflow-trainer-initializer",
        )
        if config.role_arn:
            session = self._assume_role(session, boto_config)
        self.client = session.client("s3", endpoint_url=config.endpoint, config=boto_config)

    def _assume_role(self, session: boto3.session.Session, boto_config: botocore.config.Config) -> Any:
        sts = session.client("sts", endpoint_url=self.config.endpoint, config=boto_config)
        try:
            creds = sts.assume_role(
                RoleArn=self.config.role_arn, RoleSessionName="kubeflow-trainer-initializer"
            )["Credentials"]
        except botocore.exceptions.BotoCoreError as exc:
            raise InitializerError(
                f"cannot assume ROLE_ARN={self.config.role_arn}: {one_line(exc)}"
            ) from None
        except botocore.exceptions.ClientError as exc:
            raise InitializerError(
                f"cannot assume ROLE_ARN={self.config.role_arn} ({_code(exc)}): check the role's "
                "trust policy and the caller's credentials"
            ) from None
        register_secret(creds["SecretAccessKey"])
        register_secret(creds["SessionToken"])
        return boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
            region_name=self.config.region or "us-east-1",
        )

    # -- listing --------------------------------------------------------------------------------------------
    def list_files(self) -> list[RemoteFile]:
        from ..transfer import retry

        prefix = self.uri.prefix
        folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        files = retry(lambda: self._list(folder), f"listing {self.uri}", self.tuning)
        if not files and prefix and not prefix.endswith("/"):
            single = retry(lambda: self._head(prefix), f"reading {self.uri}", self.tuning)
            files = [single] if single else []
        return files

    def _list(self, folder: str) -> list[RemoteFile]:
        files = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.uri.bucket, Prefix=folder
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/") and obj["Size"] == 0:
                        continue  # folder marker
                    files.append(self._file(key, key[len(folder) :], obj["Size"], obj.get("ETag", "")))
        except Exception as exc:
            raise self._translate(exc, f"listing {self.uri}") from None
        return files

    def _head(self, key: str) -> RemoteFile | None:
        try:
            head = self.client.head_object(Bucket=self.uri.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._translate(exc, f"reading {self.uri}") from None
        except Exception as exc:
            raise self._translate(exc, f"reading {self.uri}") from None
        return self._file(key, key.rsplit("/", 1)[-1], head["ContentLength"], head.get("ETag", ""))

    @staticmethod
    def _file(key: str, path: str, size: int, etag: str) -> RemoteFile:
        etag = etag.strip('"')
        md5 = etag if _MD5_ETAG.match(etag) else None
        return RemoteFile(path=path, size=size, key=key, version=etag or str(size), md5=md5)

    # -- reading --------------------------------------------------------------------------------------------
    @contextmanager
    def open_range(self, file: RemoteFile, start: int, end: int) -> Iterator[Iterator[bytes]]:
        what = f"s3://{self.uri.bucket}/{file.key}"
        args: dict[str, Any] = {"Bucket": self.uri.bucket, "Key": file.key}
        if start > 0 or end < file.size:
            args["Range"] = f"bytes={start}-{end - 1}"
            if file.version and file.version != str(file.size):
                args["IfMatch"] = f'"{file.version}"'
        try:
            body = self.client.get_object(**args)["Body"]
        except Exception as exc:
            raise self._translate(exc, what) from None
        try:
            yield self._chunks(body, what)
        finally:
            body.close()

    def _chunks(self, body: Any, what: str) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK)
        except Exception as exc:
            raise self._translate(exc, what) from None

    def _translate(self, exc: Exception, what: str) -> Exception:
        """Map boto errors to TransientError (retry) or a one-line InitializerError saying what to fix."""
        if isinstance(exc, (InitializerError, TransientError)):
            return exc
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            meta = exc.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            if code in _RETRY_CODES or status == 429 or status >= 500:
                retry_after = parse_retry_after(meta.get("HTTPHeaders", {}).get("retry-after"))
                return TransientError(f"{what}: {code} (HTTP {status})", retry_after)
            if code in _AUTH_CODES or status in (401, 403):
                return InitializerError(
                    f"S3 denied access to {what} ({code}): check ACCESS_KEY_ID / SECRET_ACCESS_KEY / "
                    "ROLE_ARN and that the credentials may read this bucket"
                )
            if code in ("NoSuchBucket",):
                return InitializerError(f"bucket {self.uri.bucket!r} does not exist at {self._where()}")
            if code in ("PreconditionFailed", "412"):
                return InitializerError(f"{what} changed during the download; rerun to fetch the new version")
            if code in ("NoSuchKey", "404"):
                return InitializerError(f"{what} disappeared during the download; rerun")
            return InitializerError(f"S3 error on {what}: {code} (HTTP {status}): {one_line(exc, 200)}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return InitializerError(
                "no S3 credentials found: set ACCESS_KEY_ID and SECRET_ACCESS_KEY, or ROLE_ARN"
            )
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            return InitializerError(f"invalid S3 request for {what}: {one_line(exc, 200)}")
        if (
            isinstance(exc, (botocore.exceptions.BotoCoreError, ConnectionError, TimeoutError, OSError))
            or "urllib3" in type(exc).__module__
        ):
            return TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}")
        return exc

    def _where(self) -> str:
        return self.config.endpoint or "AWS"

    def close(self) -> None:
        self.client.close()


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )
