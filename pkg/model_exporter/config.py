"""The exporter's environment: the initializers' variables (read by their own loader) plus its own.

STORAGE_URI is the destination here; ACCESS_TOKEN / HF_TOKEN, HF_ENDPOINT, ENDPOINT, ACCESS_KEY_ID,
SECRET_ACCESS_KEY, REGION, ROLE_ARN, HTTPS_PROXY and the INIT_* tuning knobs mean what they mean for the
initializers, and are parsed and redacted by the same code (`pkg.initializers.config.load_config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pkg.initializers.config import Config, EnvVar, load_config
from pkg.initializers.errors import InitializerError, register_secret
from pkg.initializers.uri import HfUri

Export = Literal["adapter", "model", "all"]
EXPORTS = ("adapter", "model", "all")
DEFAULT_SOURCE = "/workspace/output"

ENV_VARS = (
    EnvVar(
        "STORAGE_URI",
        "Required. Destination: `s3://BUCKET[/PREFIX]`, `hf://ORG/NAME[@BRANCH][/PATH]` or `file:///PATH`.",
    ),
    EnvVar("SOURCE_PATH", "The trainer's output folder.", DEFAULT_SOURCE),
    EnvVar(
        "EXPORT",
        "`adapter`, `model` (the merged or fully fine-tuned model) or `all` (every output but checkpoints/).",
        "model/ if the run wrote one, else adapter/",
    ),
    EnvVar(
        "EXPORT_OPTIONAL",
        "`true`: without STORAGE_URI, log that there is nothing to export and succeed (the runtimes' step).",
        "false",
    ),
    EnvVar("HF_PUBLIC", "`true`: a Hub repo the exporter creates is public.", "false (private)"),
    EnvVar("MODEL_REGISTRY_URL", "Kubeflow Model Registry (`https://HOST[:PORT]`): register after upload."),
    EnvVar("MODEL_REGISTRY_TOKEN", "Bearer token for the registry. Never printed."),
    EnvVar("MODEL_NAME", "Registered model name.", "the destination's last path part"),
    EnvVar("MODEL_VERSION", "Model version name (unique per model).", "the run's fingerprint"),
)


@dataclass(frozen=True)
class ExportConfig:
    shared: Config  # the initializers' settings: destination URI, S3 and Hub credentials, tuning
    source_path: Path
    export: Export | None  # None: what the run produced (model/ if any, else adapter/)
    hf_public: bool = False
    registry_url: str | None = None
    registry_token: str | None = None
    model_name: str | None = None
    model_version: str | None = None

    @property
    def uri(self) -> object:
        return self.shared.uri


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _true(env: Mapping[str, str], name: str) -> bool:
    value = (_get(env, name) or "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise InitializerError(f"{name}={value!r}: expected true or false")
    return value in ("true", "1", "yes")


def nothing_to_export(env: Mapping[str, str] | None = None) -> bool:
    """True for an optional export step (EXPORT_OPTIONAL=true) that was given no STORAGE_URI."""
    env = os.environ if env is None else env
    return _get(env, "STORAGE_URI") is None and _true(env, "EXPORT_OPTIONAL")


def load_export_config(env: Mapping[str, str] | None = None) -> ExportConfig:
    """Read and validate the environment; raise InitializerError naming the variable at fault."""
    env = os.environ if env is None else env
    registry_token = _get(env, "MODEL_REGISTRY_TOKEN")
    register_secret(registry_token)
    source = Path(_get(env, "SOURCE_PATH") or DEFAULT_SOURCE)
    if not source.is_absolute():
        raise InitializerError(f"SOURCE_PATH={str(source)!r} must be an absolute path")
    for name in ("ALLOW_PATTERNS", "IGNORE_PATTERNS"):
        if _get(env, name):
            raise InitializerError(
                f"{name} is an initializer setting the exporter does not take: choose what to export with "
                "EXPORT=adapter|model|all"
            )
    export = (_get(env, "EXPORT") or "").lower() or None
    if export is not None and export not in EXPORTS:
        raise InitializerError(f"EXPORT={export!r}: expected one of {', '.join(EXPORTS)}")
    registry_url = _get(env, "MODEL_REGISTRY_URL")
    if registry_url and not registry_url.startswith(("http://", "https://")):
        raise InitializerError(
            "MODEL_REGISTRY_URL must be an http(s):// URL, e.g. https://model-registry:8443"
        )
    # The initializers' loader reads STORAGE_URI, the S3 and Hub settings and the INIT_* knobs (and registers
    # the secrets); OUTPUT_PATH is theirs, so it is given SOURCE_PATH to satisfy its check.
    shared = load_config("model", {**env, "OUTPUT_PATH": str(source)})
    if isinstance(shared.uri, HfUri) and shared.uri.revision and shared.uri.revision.startswith("refs/"):
        raise InitializerError(f"STORAGE_URI {shared.uri}: export to a branch, not to {shared.uri.revision}")
    return ExportConfig(
        shared=shared,
        source_path=source,
        export=export,  # type: ignore[arg-type]
        hf_public=_true(env, "HF_PUBLIC"),
        registry_url=registry_url.rstrip("/") if registry_url else None,
        registry_token=registry_token,
        model_name=_get(env, "MODEL_NAME"),
        model_version=_get(env, "MODEL_VERSION"),
    )
