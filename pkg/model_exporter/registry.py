"""Kubeflow Model Registry: after the upload, register the model, a version and its artifact (the destination
URI, format safetensors, the base model and the run's metrics as version properties) with the published
`model-registry` client (pinned in requirements.txt).

MODEL_NAME defaults to the destination's last path part, MODEL_VERSION to the run's fingerprint (so a rerun of
the same export finds its version registered and stops there); a version of that name that points at another
URI is refused in one line. The token is MODEL_REGISTRY_TOKEN, else the pod's service-account token (what
the client itself falls back to). Connection errors, 429 and 5xx are retried with the initializers' policy.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pkg.initializers.errors import InitializerError, TransientError, one_line, register_secret
from pkg.initializers.progress import log
from pkg.initializers.transfer import retry
from pkg.initializers.uri import HfUri, LocalUri, S3Uri

from .config import ExportConfig
from .outputs import Selection

AUTHOR = "kubeflow-trainer model-exporter"
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_METRICS = (
    "base_model",
    "dataset",
    "method",
    "objective",
    "steps",
    "first_loss",
    "final_loss",
    "final_val_loss",
)


def register(config: ExportConfig, selection: Selection, run: dict[str, Any], result: dict[str, Any]) -> None:
    import aiohttp
    from model_registry import ModelRegistry
    from model_registry.exceptions import StoreError
    from mr_openapi.exceptions import ApiException

    assert config.registry_url
    url = config.registry_url
    token = config.registry_token or _service_account_token()
    name = config.model_name or default_name(config.shared.uri)
    version = config.model_version or str(run.get("fingerprint") or "")[:12] or time.strftime("%Y%m%d%H%M%S")
    uri = result["uri"]
    what = f"registering {name} version {version} in the Model Registry at {url}"

    def once() -> str:
        try:
            with warnings.catch_warnings():  # "User access token is missing": said below when it matters
                warnings.simplefilter("ignore")
                client = ModelRegistry(
                    url,
                    urlsplit(url).port,
                    author=AUTHOR,
                    is_secure=url.startswith("https://"),
                    user_token=token,
                    custom_ca=os.environ.get("SSL_CERT_FILE") or None,
                    log_level=logging.ERROR,  # its port hints are not for kubectl logs; errors come back here
                )
            known = client.get_registered_model(name) is not None
            if known and client.get_model_version(name, version) is not None:
                artifact = client.get_model_artifact(name, version)
                if artifact is not None and artifact.uri == uri:
                    return "already registered"
                raise InitializerError(
                    f"{name} version {version} is already registered in the Model Registry for "
                    f"{artifact.uri if artifact else 'no artifact'}, not {uri}: set MODEL_VERSION"
                )
            client.register_model(
                name,
                uri,
                model_format_name="safetensors",
                model_format_version="1",
                version=version,
                version_description=_description(selection, run),
                metadata={k: run[k] for k in _METRICS if run.get(k) is not None},
                model_source_kind="kubeflow-trainer",
                model_source_name=str(run.get("base_model") or ""),
            )
            return "registered"
        except ApiException as exc:
            if exc.status == 429 or (exc.status or 0) >= 500:
                raise TransientError(f"{what}: HTTP {exc.status}") from None
            hint = "check MODEL_REGISTRY_TOKEN" if exc.status in (401, 403) else "check MODEL_REGISTRY_URL"
            raise InitializerError(f"{what}: HTTP {exc.status} {one_line(exc.reason, 100)}; {hint}") from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {one_line(exc, 200)}") from None
        except StoreError as exc:
            raise InitializerError(f"{what}: {one_line(exc, 300)}") from None

    outcome = retry(once, what, config.shared.tuning)
    log(f"{name} version {version} {outcome} in the Model Registry at {url} (artifact {uri}, safetensors)")


def default_name(uri: object) -> str:
    """The destination's last path part: s3://b/models/qwen-lora -> qwen-lora, hf://org/name -> name."""
    if isinstance(uri, HfUri):
        return uri.repo_id.split("/")[-1]
    if isinstance(uri, S3Uri):
        return uri.prefix.rstrip("/").rsplit("/", 1)[-1] or uri.bucket
    assert isinstance(uri, LocalUri)
    return Path(uri.path).name or "model"


def _description(selection: Selection, run: dict[str, Any]) -> str:
    what = "LoRA adapter" if selection.what == "adapter" else "fine-tuned model"
    base = f" of {run['base_model']}" if run.get("base_model") else ""
    loss = f", final loss {run['final_loss']:.4f}" if isinstance(run.get("final_loss"), (int, float)) else ""
    return f"{what}{base}: {run.get('method', '?')}, {run.get('steps', '?')} steps{loss}"


def _service_account_token() -> str | None:
    try:
        token = SERVICE_ACCOUNT_TOKEN.read_text().strip()
    except OSError:
        return None
    register_secret(token)
    return token or None
