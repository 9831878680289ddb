"""Configuration from environment variables, validated up front into one typed dataclass.

The Kubeflow SDK passes every optional field upper-cased and joins lists with commas, so that is exactly
what is read here. Tuning knobs (`INIT_*`) are extensions with safe defaults; users rarely need them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from .errors import InitializerError, register_secret
from .uri import S3Uri, StorageUri, parse_uri

Kind = Literal["dataset", "model"]

DEFAULT_OUTPUT = {"dataset": "/workspace/dataset", "model": "/workspace/model"}
# Upstream model defaults: skip framework duplicates of the weights; see `model_default_ignore`.
MODEL_DEFAULT_IGNORE = ("*.msgpack", "*.h5", "*.bin", "*.pt", "*.pth")
MODEL_FALLBACK_IGNORE = ("*.msgpack", "*.h5")

MiB = 1024 * 1024


@dataclass(frozen=True)
class EnvVar:
    """One environment variable the initializers read; the README reference is generated from these."""

    name: str
    help: str
    default: str = ""


DEFAULT_PART_SIZE = 16 * MiB
MAX_AUTO_PART_SIZE = 64 * MiB


@dataclass(frozen=True)
class Tuning:
    """Engine knobs; defaults suit a pod with a few cores and a fast network."""

    concurrency: int = 16  # INIT_CONCURRENCY: parallel requests
    # INIT_PART_SIZE: bytes per ranged request of a large file. Unset (0): 16 MiB, grown up to 64 MiB when the
    # large files alone fill every connection, so servers see fewer, larger requests.
    part_size: int = 0
    read_timeout: float = 60.0  # INIT_READ_TIMEOUT: seconds a read may stall before it is retried
    max_attempts: int = 8  # INIT_MAX_ATTEMPTS: tries per request before giving up
    retry_base: float = 0.5  # INIT_RETRY_BASE: first backoff in seconds (doubles, with jitter)
    retry_cap: float = 30.0  # INIT_RETRY_CAP: longest single backoff or Retry-After honoured
    progress_interval: float = 5.0  # INIT_PROGRESS_INTERVAL: seconds between progress lines
    # INIT_MAX_FILES / INIT_LIST_TIMEOUT: bounds on a listing, so a server that pages forever (or a bucket far
    # larger than meant) ends in a clear error instead of filling memory.
    max_files: int = 5_000_000
    list_timeout: float = 3600.0


_TUNING = Tuning()
ENV_VARS = (
    EnvVar(
        "STORAGE_URI",
        "Required. `hf://ORG/NAME[@REVISION][/SUB/PATH]`, `s3://BUCKET[/PREFIX]`, `file:///PATH` or `/PATH`.",
    ),
    EnvVar("OUTPUT_PATH", "Absolute folder to fill.", "/workspace/dataset or /workspace/model"),
    EnvVar(
        "OVERWRITE",
        "`true`: empty an OUTPUT_PATH that holds another source's download or other files first "
        "(otherwise refused); symlinks are removed, never followed.",
        "false",
    ),
    EnvVar("ACCESS_TOKEN", "Hub token for private or gated repos. Never printed or written to disk."),
    EnvVar("HF_TOKEN", "Accepted in place of ACCESS_TOKEN."),
    EnvVar("ALLOW_PATTERNS", "Comma-separated globs on the path relative to the source root: only these."),
    EnvVar(
        "IGNORE_PATTERNS",
        "Comma-separated globs to skip. Model default: `*.msgpack,*.h5,*.bin,*.pt,*.pth`, "
        "but `.bin`/`.pt` weights are kept when the source has no `*.safetensors`.",
    ),
    EnvVar("HF_ENDPOINT", "Hub or mirror base URL.", "https://huggingface.co"),
    EnvVar("ENDPOINT", "S3-compatible endpoint (MinIO, Ceph, GCS interop); path-style addressing."),
    EnvVar(
        "ACCESS_KEY_ID",
        "S3 access key (with SECRET_ACCESS_KEY); unset: the AWS default chain (IRSA, instance profile).",
    ),
    EnvVar("SECRET_ACCESS_KEY", "S3 secret key. Never printed."),
    EnvVar(
        "REGION",
        "S3 region to start from; a bucket elsewhere is followed (its listing names its region).",
        "AWS_DEFAULT_REGION, else us-east-1",
    ),
    EnvVar("ROLE_ARN", "IAM role assumed through STS before reading S3."),
    EnvVar(
        "HTTPS_PROXY",
        "Proxy for https:// sources (also HTTP_PROXY for http://, NO_PROXY for exceptions; either case); "
        "`user:password@` in it is sent as Proxy-Authorization and never printed.",
    ),
    EnvVar("INIT_CONCURRENCY", "Parallel requests.", str(_TUNING.concurrency)),
    EnvVar("INIT_PART_SIZE", "Bytes per ranged request of a large file (default 16 MiB, grown to 64 MiB)."),
    EnvVar(
        "INIT_READ_TIMEOUT",
        "Seconds a read may stall, or deliver under 64 KiB, before it is retried.",
        f"{_TUNING.read_timeout:g}",
    ),
    EnvVar("INIT_MAX_ATTEMPTS", "Tries per request before giving up.", str(_TUNING.max_attempts)),
    EnvVar("INIT_RETRY_BASE", "First backoff in seconds (doubles, with jitter).", f"{_TUNING.retry_base:g}"),
    EnvVar(
        "INIT_RETRY_CAP",
        "Longest single backoff or Retry-After honoured, in seconds.",
        f"{_TUNING.retry_cap:g}",
    ),
    EnvVar("INIT_PROGRESS_INTERVAL", "Seconds between progress lines.", f"{_TUNING.progress_interval:g}"),
    EnvVar("INIT_MAX_FILES", "Most entries a listing may hold before the run stops.", str(_TUNING.max_files)),
    EnvVar(
        "INIT_LIST_TIMEOUT",
        "Seconds the whole listing may take before the run stops.",
        f"{_TUNING.list_timeout:g}",
    ),
)


@dataclass(frozen=True)
class Config:
    kind: Kind
    uri: StorageUri
    output_path: Path
    access_token: str | None = None
    allow_patterns: tuple[str, ...] = ()
    ignore_patterns: tuple[str, ...] = ()
    endpoint: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str | None = None
    role_arn: str | None = None
    hf_endpoint: str = "https://huggingface.co"  # without any user:password@ (see hf_login)
    hf_login: tuple[str, str] | None = None  # user and password HF_ENDPOINT carried, sent as Basic auth
    overwrite: bool = False  # OVERWRITE: empty an OUTPUT_PATH holding another source's files
    tuning: Tuning = field(default_factory=Tuning)

    @property
    def patterns_given(self) -> bool:
        return bool(self.allow_patterns or self.ignore_patterns)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _patterns(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = _get(env, name) or ""
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (_get(env, name) or "false").lower()
    if raw not in ("true", "false", "1", "0", "yes", "no"):
        raise InitializerError(f"{name}={raw!r}: expected true or false")
    return raw in ("true", "1", "yes")


def _number(env: Mapping[str, str], name: str, default: float, cast: type, minimum: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise InitializerError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):  # nan passes every comparison; inf overflows timers and waits
        raise InitializerError(f"{name}={raw!r} must be a finite number")
    if value < minimum:
        raise InitializerError(f"{name}={raw!r} must be at least {minimum}")
    return value


def load_tuning(env: Mapping[str, str]) -> Tuning:
    d = Tuning()
    return Tuning(
        concurrency=int(_number(env, "INIT_CONCURRENCY", d.concurrency, int, 1)),
        part_size=int(_number(env, "INIT_PART_SIZE", d.part_size, int, 64 * 1024)),
        read_timeout=_number(env, "INIT_READ_TIMEOUT", d.read_timeout, float, 0.1),
        max_attempts=int(_number(env, "INIT_MAX_ATTEMPTS", d.max_attempts, int, 1)),
        retry_base=_number(env, "INIT_RETRY_BASE", d.retry_base, float, 0.0),
        retry_cap=_number(env, "INIT_RETRY_CAP", d.retry_cap, float, 0.0),
        progress_interval=_number(env, "INIT_PROGRESS_INTERVAL", d.progress_interval, float, 0.1),
        max_files=int(_number(env, "INIT_MAX_FILES", d.max_files, int, 1)),
        list_timeout=_number(env, "INIT_LIST_TIMEOUT", d.list_timeout, float, 0.1),
    )


def _endpoint_login(raw: str) -> tuple[str, tuple[str, str] | None]:
    """Split `https://user:password@host` into the URL without the login (what is stored and printed)
    and the login, whose password is registered for redaction first."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InitializerError("HF_ENDPOINT must be an http(s):// URL, e.g. https://huggingface.co")
    if "@" not in parts.netloc:
        return raw, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    register_secret(unquote(password))
    register_secret(password)
    register_secret(userinfo)
    return parts._replace(netloc=host).geturl(), (unquote(user), unquote(password))


def _s3_endpoint(endpoint: str, uri: StorageUri) -> str:
    """ENDPOINT as given, once it has a scheme and no bucket in its path. Without a scheme the store's
    protocol is a guess (a MinIO on :9000 usually speaks plain HTTP), and a guessed https:// against a plain
    server can only fail, slowly; the bucket in the path would be sent twice (`/BUCKET/BUCKET/key`)."""
    parts = urlsplit(endpoint)
    if "://" not in endpoint or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        address = endpoint.partition("://")[2] or endpoint
        raise InitializerError(
            f"ENDPOINT={endpoint!r} needs http:// or https://, e.g. http://{address} "
            "for a store that speaks plain HTTP (MinIO's default) or https://... for TLS"
        )
    path = parts.path.strip("/")
    if isinstance(uri, S3Uri) and path and path.split("/")[0] == uri.bucket:
        root = parts._replace(path="", query="", fragment="").geturl()
        raise InitializerError(
            f"ENDPOINT={endpoint!r} ends with the bucket {uri.bucket!r}, which STORAGE_URI names already: "
            f"set ENDPOINT={root} (the store's address, no path)"
        )
    return endpoint.rstrip("/")


def load_config(kind: Kind, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the environment; raise InitializerError naming the variable at fault."""
    env = os.environ if env is None else env
    storage_uri = _get(env, "STORAGE_URI")
    if storage_uri is None:
        raise InitializerError(
            "STORAGE_URI is not set: set it to hf://ORG/NAME, s3://BUCKET/PREFIX or file:///PATH"
        )
    token = _get(env, "ACCESS_TOKEN") or _get(env, "HF_TOKEN")
    secret = _get(env, "SECRET_ACCESS_KEY")
    for value in (token, secret, _get(env, "AWS_SECRET_ACCESS_KEY"), _get(env, "AWS_SESSION_TOKEN")):
        register_secret(value)
    output = Path(_get(env, "OUTPUT_PATH") or DEFAULT_OUTPUT[kind])
    if not output.is_absolute():
        raise InitializerError(f"OUTPUT_PATH={str(output)!r} must be an absolute path")
    key_id = _get(env, "ACCESS_KEY_ID")
    if bool(key_id) != bool(secret):
        raise InitializerError("set both ACCESS_KEY_ID and SECRET_ACCESS_KEY, or neither")
    endpoint = _get(env, "ENDPOINT")
    hf_endpoint, hf_login = _endpoint_login(
        (_get(env, "HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    )
    uri = parse_uri(storage_uri)
    if endpoint:
        endpoint = _s3_endpoint(endpoint, uri)
    return Config(
        kind=kind,
        uri=uri,
        output_path=output,
        access_token=token,
        allow_patterns=_patterns(env, "ALLOW_PATTERNS"),
        ignore_patterns=_patterns(env, "IGNORE_PATTERNS"),
        endpoint=endpoint,
        access_key_id=key_id,
        secret_access_key=secret,
        region=_get(env, "REGION"),
        role_arn=_get(env, "ROLE_ARN"),
        hf_endpoint=hf_endpoint,
        hf_login=hf_login,
        overwrite=_flag(env, "OVERWRITE"),
        tuning=load_tuning(env),
    )
