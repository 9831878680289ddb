"""S3 source (AWS and every S3-compatible store through ENDPOINT: MinIO, Ceph, GCS interop).

Credentials: ACCESS_KEY_ID / SECRET_ACCESS_KEY, else the default AWS chain (IRSA, instance profile);
ROLE_ARN is assumed through STS (refreshed before it expires); whatever the chain resolves is redacted.
Listing goes through botocore, whose ListObjectsV2 requests are sent through our pool (`_send_listing`) so
their answers are bounded in time and size; every entry is checked by `Listing`. Object bytes go through
the shared ranged reader (`http.get_range`) with one SigV4 signature per request (`sigv4.py`), about a third
of the client CPU of a botocore `get_object` call, which matters for many small objects. Ranged GETs carry
If-Match on the ETag, and every answer's ETag is compared with it, so an object replaced mid-download fails
instead of mixing versions.
Single-part ETags are MD5s and get verified; multipart ETags are checked against the parts' MD5s; except for
objects encrypted with SSE-KMS or SSE-C (their GETs say so), whose ETags are not MD5s: those are verified
by size and part structure, with a line saying so.

Region: REGION, else AWS_DEFAULT_REGION or the profile's, else us-east-1. A bucket elsewhere still works, as
with boto3: botocore follows the redirect for listing, and the object GETs follow the region the bucket
names in its listing (`x-amz-bucket-region`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.parsers
import botocore.session

from ..config import Config
from ..errors import (
    InitializerError,
    TransientError,
    one_line,
    origin_of,
    parse_retry_after,
    register_secret,
    tls_answer,
    tls_failure,
)
from ..listing import Listing
from ..progress import log
from ..retry import retry
from ..uri import S3Uri
from . import sigv4
from .api import MAX_DOCUMENT, answer_deadline, read_bounded
from .base import RemoteFile, Source
from .http import TRANSIENT_CODES, Pool, get_range, open_reply

_REGION_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-[1-9][0-9]*$")
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "Forbidden",
    "403",
    "401",
}
_RETRY_CODES = TRANSIENT_CODES | {"503", "500"}
# With these, AWS gives ETags that are not MD5s of the object (SSE-KMS, DSSE-KMS, SSE-C).
_KMS = ("aws:kms", "aws:kms:dsse")
_SSE_C = "x-amz-server-side-encryption-customer-algorithm"
_ROLE_SESSION = "kubeflow-trainer-initializer"


class S3Source(Source):
    def __init__(self, uri: S3Uri, config: Config):
        self.uri = uri
        self.config = config
        self.tuning = config.tuning
        session = _session(config.access_key_id, config.secret_access_key)
        region = config.region or session.get_config_variable("region") or "us-east-1"
        boto_config = botocore.config.Config(
            region_name=region,
            max_pool_connections=4,  # listing only; objects go through self.http
            connect_timeout=min(10, config.tuning.read_timeout),
            read_timeout=config.tuning.read_timeout,
            retries={"total_max_attempts": 1},  # the engine retries, with one policy for every source
            user_agent_extra="kubeflow-trainer-initializer",
        )
        try:
            credentials = (
                self._assume_role(session, boto_config) if config.role_arn else session.get_credentials()
            )
        except botocore.exceptions.BotoCoreError as exc:
            raise self._translate(exc, f"reading {uri}") from None
        if credentials is None:
            raise self._translate(botocore.exceptions.NoCredentialsError(), f"reading {uri}")
        self.credentials: botocore.credentials.Credentials = credentials
        self._secrets(credentials.get_frozen_credentials())
        if config.role_arn:  # list with the role's keys (listing is over long before they expire)
            keys = credentials.get_frozen_credentials()
            session = _session(keys.access_key, keys.secret_key, keys.token)
        s3_config = botocore.config.Config(s3={"addressing_style": "path"} if config.endpoint else {})
        self._session, self._boto_config = session, boto_config.merge(s3_config)
        self._use_region(region)
        # AWS_CA_BUNDLE: a private CA for the store (MinIO, Ceph), as botocore honours it for listing.
        ca_bundle = os.environ.get("AWS_CA_BUNDLE") or None
        self.http = Pool(config.tuning.concurrency, config.tuning.read_timeout, ca_bundle)
        self._encrypted: set[str] = set()  # keys whose GETs showed SSE-KMS / SSE-C: ETag not an MD5
        self._lock = threading.Lock()

    def _use_region(self, region: str) -> None:
        """A listing client for `region`, and the object URL and signing region that go with it."""
        self.client = self._session.create_client(
            "s3",
            endpoint_url=self.config.endpoint,
            config=self._boto_config.merge(botocore.config.Config(region_name=region)),
        )
        self.client.meta.events.register("before-send.s3.ListObjectsV2", self._send_listing)
        self.region = self.client.meta.region_name or region
        self.base_url = _object_url_base(self.client, self.uri.bucket)

    def _follow_bucket_region(self, region: str | None) -> None:
        """Sign object GETs for the region the bucket names (in its listing, or else HeadBucket's answer).

        botocore quietly redirects its own calls to the bucket's region; the GETs signed here would fail
        with AuthorizationHeaderMalformed. boto3 users (and the upstream images) never need REGION for that.
        """
        if not region or region == self.region or not _REGION_NAME.match(region):
            return
        log(f"bucket {self.uri.bucket} is in region {region}, not {self.region}: using {region}")
        self.client.close()
        self._use_region(region)

    def _assume_role(
        self, session: botocore.session.Session, boto_config: botocore.config.Config
    ) -> botocore.credentials.RefreshableCredentials:
        """The role's temporary credentials, fetched now (to fail early) and again before they expire."""
        sts = session.create_client("sts", endpoint_url=self.config.endpoint, config=boto_config)

        def fetch() -> dict[str, Any]:
            role = sts.assume_role(RoleArn=self.config.role_arn, RoleSessionName=_ROLE_SESSION)
            creds = role["Credentials"]
            register_secret(creds["SecretAccessKey"])
            register_secret(creds["SessionToken"])
            return {
                "access_key": creds["AccessKeyId"],
                "secret_key": creds["SecretAccessKey"],
                "token": creds["SessionToken"],
                "expiry_time": str(creds["Expiration"]),  # an ISO string (see _session)
            }

        try:
            metadata = fetch()
        except botocore.exceptions.BotoCoreError as exc:
            raise InitializerError(
                f"cannot assume ROLE_ARN={self.config.role_arn}: {one_line(exc)}"
            ) from None
        except botocore.exceptions.ClientError as exc:
            raise InitializerError(
                f"cannot assume ROLE_ARN={self.config.role_arn} ({_code(exc)}): check the role's "
                "trust policy and the caller's credentials"
            ) from None
        return botocore.credentials.RefreshableCredentials.create_from_metadata(
            metadata, refresh_using=fetch, method="assume-role"
        )

    # -- listing --------------------------------------------------------------------------------------------
    def list_files(self) -> list[RemoteFile]:
        prefix = self.uri.prefix
        folder = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        files = retry(lambda: self._list(folder), f"listing {self.uri}", self.tuning)
        if not files and prefix and not prefix.endswith("/"):
            files = retry(lambda: self._head(prefix), f"reading {self.uri}", self.tuning)
        return files

    def _listing(self, prefix: str) -> Listing:
        return Listing(f"S3 bucket {self.uri.bucket} at {self._where()}", self.tuning, prefix)

    def _send_listing(self, request: Any, **_: Any) -> botocore.awsrequest.AWSResponse:
        """Send a listing request botocore prepared (and signed) through our pool, where its answer is bounded
        like the Hub's: INIT_READ_TIMEOUTs in all (a trickling server fails as a stalled one) and 64 MiB,
        decompressed. botocore still parses it and handles redirects and errors."""
        where = f"S3 at {self._where()}"
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        listing = self._listing_now
        deadline = answer_deadline(self.http, listing.left())
        reply = open_reply(self.http, request.url, headers, where, for_botocore=True)
        complete = False
        try:
            body = read_bounded(
                reply,
                where,
                MAX_DOCUMENT,
                deadline,
                truncate=reply.status >= 300,
                via=(self.http, request.url),
            )
            complete = True
        except TransientError:
            listing.left()  # the listing's own deadline, when that is what passed, says more
            raise
        finally:
            reply.finish(complete)
        if wrong := tls_answer(reply.status, body, request.url):
            raise wrong
        answer = {k: v for k, v in reply.headers.items() if k.lower() != "content-encoding"}  # inflated
        return botocore.awsrequest.AWSResponse(request.url, reply.status, answer, _Body(body))

    def _list(self, folder: str) -> list[RemoteFile]:
        listing = self._listing_now = self._listing(folder)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.uri.bucket, Prefix=folder
            )
            bucket_region = None
            for page in pages:
                listing.page()
                headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                bucket_region = headers.get("x-amz-bucket-region", bucket_region)
                for obj in page.get("Contents", []):
                    key, size = obj.get("Key"), obj.get("Size")
                    if isinstance(key, str) and key.endswith("/") and size == 0:
                        continue  # folder marker
                    self._add(listing, key, size, obj.get("ETag"))
            if bucket_region is None and not self.config.endpoint:  # AWS names it there; ask once more
                bucket_region = self._head_bucket_region()
            self._follow_bucket_region(bucket_region)
        except Exception as exc:
            raise self._translate(exc, f"listing {self.uri}") from None
        return listing.files()

    def _head_bucket_region(self) -> str | None:
        """The bucket's region from HeadBucket, whose answer is documented to carry it."""
        try:
            answer = self.client.head_bucket(Bucket=self.uri.bucket)
        except botocore.exceptions.ClientError:
            return None  # not allowed, or not an AWS-like store: keep the region we have
        headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return answer.get("BucketRegion") or headers.get("x-amz-bucket-region")

    def _head(self, key: str) -> list[RemoteFile]:
        try:
            head = self.client.head_object(Bucket=self.uri.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return []
            raise self._translate(exc, f"reading {self.uri}") from None
        except Exception as exc:
            raise self._translate(exc, f"reading {self.uri}") from None
        listing = self._listing(key)
        self._add(listing, key, head.get("ContentLength"), head.get("ETag"), key.rsplit("/", 1)[-1])
        return listing.files()

    @staticmethod
    def _add(listing: Listing, key: object, size: object, etag: object, path: str | None = None) -> None:
        etag = etag.strip('"') if isinstance(etag, str) else ""
        md5 = etag if _MD5_ETAG.match(etag) else None
        of_parts = etag if _MULTIPART_ETAG.match(etag) else None
        version = etag or str(size)
        listing.add(key, size, version, path=path, md5=md5, md5_of_parts=of_parts)

    def part_sizes(self, file: RemoteFile, exact: bool = False) -> list[int] | None:
        """From HEAD ?partNumber=N: part 1 only, or with `exact` every part."""
        if not file.md5_of_parts:
            return None
        count = int(file.md5_of_parts.rsplit("-", 1)[1])
        if exact:
            return [self._part_length(file, n, count) for n in range(1, count + 1)]
        first = self._part_length(file, 1, count)
        last = file.size - first * (count - 1)
        return [first] * (count - 1) + [last] if 0 < last <= first else None

    def _part_length(self, file: RemoteFile, number: int, count: int) -> int:
        what = f"s3://{self.uri.bucket}/{file.key} part {number}"

        def head() -> int:
            try:
                # No If-Match: some stores answer with the part's own ETag here. The ranged GETs carry it.
                answer = self.client.head_object(Bucket=self.uri.bucket, Key=file.key, PartNumber=number)
            except Exception as exc:
                raise self._translate(exc, what) from None
            if answer.get("PartsCount", count) != count:
                raise InitializerError(f"{what}: the object changed during the download; rerun")
            return int(answer["ContentLength"])

        return retry(head, f"reading {what}", self.tuning)

    # -- reading --------------------------------------------------------------------------------------------
    def open_range(self, file: RemoteFile, start: int, end: int) -> AbstractContextManager[Iterator[bytes]]:
        what = f"s3://{self.uri.bucket}/{file.key}"
        headers = {}
        etag = file.version if file.version != str(file.size) else None
        if (start > 0 or end < file.size) and etag:
            headers["If-Match"] = f'"{etag}"'
        url = f"{self.base_url}/{quote(file.key, safe='/~')}"
        return get_range(
            self.http,
            url,
            what,
            start,
            end,
            file.size,
            headers,
            fatal=lambda status, code: self._fatal(status, code, what),
            sign=self.sign,
            etag=etag,  # checked on the answer too: some stores (rclone serve s3) ignore If-Match
            inspect=lambda headers: self._note_encryption(file, headers),
        )

    def _note_encryption(self, file: RemoteFile, headers: Any) -> None:
        if file.key in self._encrypted or not (file.md5 or file.md5_of_parts):
            return
        kms = (headers.get("x-amz-server-side-encryption") or "").lower() in _KMS
        if not kms and not headers.get(_SSE_C):
            return
        with self._lock:
            first = not self._encrypted
            self._encrypted.add(file.key)
        if first:
            log(
                f"s3://{self.uri.bucket}/{file.key} is encrypted with {'SSE-KMS' if kms else 'SSE-C'}: the "
                "ETags of such objects are not MD5s, so they are verified by size and part structure only"
            )

    def verifiable(self, file: RemoteFile) -> bool:
        return file.key not in self._encrypted

    def sign(
        self, url: str, headers: dict[str, str], method: str = "GET", payload_hash: str = sigv4.EMPTY_SHA256
    ) -> dict[str, str]:
        """SigV4 headers for a request to `url` (a GET unless said; the exporter PUTs objects with it); the
        credentials refresh themselves when they are temporary."""
        keys = self.credentials.get_frozen_credentials()
        if keys.token != self._token:  # refreshed (IRSA, container and instance credentials expire)
            self._secrets(keys)
        return sigv4.sign(
            url,
            headers,
            keys.access_key,
            keys.secret_key,
            keys.token,
            self.region,
            method=method,
            payload_hash=payload_hash,
        )

    def _secrets(self, keys: botocore.credentials.ReadOnlyCredentials) -> None:
        """Redact what the credential chain resolved (environment, profile, IRSA web identity, container or
        instance endpoint) from everything printed, as the keys given in the environment are."""
        register_secret(keys.secret_key)
        register_secret(keys.token)
        self._token = keys.token

    def _fatal(self, status: int, code: str, what: str) -> InitializerError:
        """The same one-line messages as for botocore's errors, for an error answer to a GET."""
        return self._client_error(code or str(status), status, what, f"HTTP {status}")

    def _translate(self, exc: Exception, what: str) -> Exception:
        """Map boto errors to TransientError (retry) or a one-line InitializerError saying what to fix."""
        if isinstance(exc, (InitializerError, TransientError)):
            return exc
        if tls := tls_failure(exc, origin_of(self.config.endpoint) if self.config.endpoint else "S3"):
            return tls
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            meta = exc.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode") or 0)
            if code in _RETRY_CODES or status == 429 or status >= 500:
                retry_after = parse_retry_after(meta.get("HTTPHeaders", {}).get("retry-after"))
                return TransientError(f"{what}: {code} (HTTP {status})", retry_after)
            return self._client_error(code, status, what, one_line(exc, 200))
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return InitializerError(
                "no S3 credentials found: set ACCESS_KEY_ID and SECRET_ACCESS_KEY, or ROLE_ARN"
            )
        # Not XML, or XML that is not S3's (botocore's parser lets a ValueError out for <Size>abc</Size>).
        if isinstance(exc, (botocore.parsers.ResponseParserError, ValueError)):
            return InitializerError(
                f"S3 at {self._where()} answered {what} with something that is not an S3 answer "
                f"({one_line(exc, 120)}): a proxy or captive portal in the way, or not an S3 endpoint"
            )
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            return InitializerError(f"invalid S3 request for {what}: {one_line(exc, 200)}")
        if (
            isinstance(exc, (botocore.exceptions.BotoCoreError, ConnectionError, TimeoutError, OSError))
            or "urllib3" in type(exc).__module__
        ):
            return TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}")
        return exc

    def _client_error(self, code: str, status: int, what: str, detail: str) -> InitializerError:
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):  # botocore redirects only its calls
            return InitializerError(
                f"S3 refused {what} ({code}): the bucket is probably in another region than "
                f"REGION={self.region}; set REGION to the bucket's region"
            )
        if code in _AUTH_CODES or status in (401, 403):
            return InitializerError(
                f"S3 denied access to {what} ({code}): check ACCESS_KEY_ID / SECRET_ACCESS_KEY / "
                "ROLE_ARN and that the credentials may read this bucket"
            )
        if code == "NoSuchBucket":
            path = urlsplit(self.config.endpoint or "").path.strip("/")
            hint = (
                f" (ENDPOINT's path /{path} goes before it: give the store's address alone)" if path else ""
            )
            return InitializerError(f"bucket {self.uri.bucket!r} does not exist at {self._where()}{hint}")
        if code in ("PreconditionFailed", "412"):
            return InitializerError(f"{what} changed during the download; rerun to fetch the new version")
        if code in ("NoSuchKey", "404") and what.startswith("listing "):  # a bucket has no such answer
            return InitializerError(
                f"S3 at {self._where()} answered {what} with {code}, as if the bucket were an object: "
                "ENDPOINT should be the store's address alone (any path in it goes before the bucket)"
            )
        if code in ("NoSuchKey", "404"):
            return InitializerError(f"{what} disappeared during the download; rerun")
        return InitializerError(f"S3 error on {what}: {code} (HTTP {status}): {detail}")

    def _where(self) -> str:
        return self.config.endpoint or "AWS"

    def host(self, file: RemoteFile) -> str:
        return urlsplit(self.base_url).netloc

    def abort(self) -> None:
        self.http.abort()

    def close(self) -> None:
        self.client.close()
        self.http.clear()


class _Body:
    """A read answer, as botocore's AWSResponse reads its `raw`."""

    def __init__(self, data: bytes):
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


class _Prepared(Exception):
    """Carries the URL of a request botocore prepared, to stop it before it is sent."""


def _object_url_base(client: Any, bucket: str) -> str:
    """The URL botocore itself would GET an object of `bucket` from, without the key: every endpoint rule
    applied (virtual-hosted or path style, regional host, ENDPOINT, FIPS / dual-stack settings), learnt from
    one HeadObject that is prepared and signed locally but never sent."""

    def stop(request: Any, **_: Any) -> None:
        raise _Prepared(request.url)

    event = "before-send.s3.HeadObject"
    client.meta.events.register_first(event, stop, unique_id="initializer-object-url")
    try:
        client.head_object(Bucket=bucket, Key="k")
    except _Prepared as prepared:
        return str(prepared.args[0]).split("?", 1)[0].removesuffix("/k")
    finally:
        client.meta.events.unregister(event, unique_id="initializer-object-url")
    raise AssertionError("botocore sent a request it was told not to")


def _session(key_id: str | None, secret: str | None, token: str | None = None) -> botocore.session.Session:
    """A botocore session (boto3's resource layer and s3transfer are not needed) with the given keys, else
    the default chain. Listing timestamps stay strings: parsing them costs more than the XML itself."""
    session = botocore.session.get_session()
    if key_id and secret:
        session.set_credentials(key_id, secret, token)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )
