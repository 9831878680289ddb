"""Sources behind one interface: Hugging Face Hub, S3 (and compatibles), local volumes."""

from __future__ import annotations

from ..config import Config
from ..uri import HfUri, LocalUri, S3Uri
from .base import RemoteFile, Source

__all__ = ["RemoteFile", "Source", "open_source"]


def open_source(config: Config) -> Source:
    """Build the source STORAGE_URI names (imports lazily so each image loads only what it uses)."""
    uri = config.uri
    if isinstance(uri, HfUri):
        from .hf import HfSource

        return HfSource(uri, config)
    if isinstance(uri, S3Uri):
        from .s3 import S3Source

        return S3Source(uri, config)
    assert isinstance(uri, LocalUri)
    from .local import LocalSource

    return LocalSource(uri, config)
