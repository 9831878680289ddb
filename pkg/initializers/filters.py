"""ALLOW_PATTERNS / IGNORE_PATTERNS, and the model initializer's default weight-format choice."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from .config import MODEL_DEFAULT_IGNORE, MODEL_FALLBACK_IGNORE, Config
from .sources.base import RemoteFile


def _expand(patterns: Sequence[str]) -> list[str]:
    # "folder/" means everything below it, as in huggingface_hub.
    return [p + "*" if p.endswith("/") else p for p in patterns]


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(path, p) for p in _expand(patterns))


def select(files: list[RemoteFile], allow: Sequence[str], ignore: Sequence[str]) -> list[RemoteFile]:
    """Keep files matching any allow pattern (all when none) and no ignore pattern."""
    return [f for f in files if (not allow or matches(f.path, allow)) and not matches(f.path, ignore)]


def apply_filters(config: Config, files: list[RemoteFile]) -> tuple[list[RemoteFile], str]:
    """Filter as configured; returns the files and a one-line note on what was applied."""
    if config.kind == "model" and not config.patterns_given:
        has_safetensors = any(f.path.endswith(".safetensors") for f in files)
        ignore = MODEL_DEFAULT_IGNORE if has_safetensors else MODEL_FALLBACK_IGNORE
        note = "default model filter: " + (
            "safetensors weights, skipping " + ",".join(ignore)
            if has_safetensors
            else "no *.safetensors in the source, keeping .bin/.pt weights, skipping " + ",".join(ignore)
        )
        return select(files, (), ignore), note
    note = f"allow={','.join(config.allow_patterns) or '*'} ignore={','.join(config.ignore_patterns) or '-'}"
    return select(files, config.allow_patterns, config.ignore_patterns), note
