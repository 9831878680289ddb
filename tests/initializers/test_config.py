"""STORAGE_URI parsing and environment validation (in-process: pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkg.initializers.config import load_config
from pkg.initializers.errors import InitializerError, redact, register_secret
from pkg.initializers.filters import apply_filters
from pkg.initializers.safety import safe_relative
from pkg.initializers.sources.base import RemoteFile
from pkg.initializers.uri import HfUri, LocalUri, S3Uri, parse_uri

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://org/name", HfUri("org/name")),
        ("hf://org/name@v1.0", HfUri("org/name", "v1.0")),
        ("hf://org/name@main/data/train", HfUri("org/name", "main", "data/train")),
        ("hf://org/name/sub/", HfUri("org/name", None, "sub")),
        ("hf://org/name@refs%2Fpr%2F1", HfUri("org/name", "refs/pr/1")),
        ("hf://org/name@refs/pr/1", HfUri("org/name", "refs/pr/1")),
        (
            "hf://org/name@refs/convert/parquet/default/train",
            HfUri("org/name", "refs/convert/parquet", "default/train"),
        ),
        ("s3://bucket", S3Uri("bucket", "")),
        ("s3://bucket/some/prefix/", S3Uri("bucket", "some/prefix/")),
        ("file:///mnt/data/", LocalUri("/mnt/data")),
        ("/mnt/data", LocalUri("/mnt/data")),
    ],
)
def test_parse_uri(text: str, expected: object) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("org/name", "no scheme"),
        ("hf://org", "missing repository"),
        ("hf://org/name@", "empty revision"),
        ("hf://org/na me", "not a valid repository name"),
        ("hf://org/name/../x", "not allowed"),
        ("s3://", "missing bucket"),
        ("s3:///prefix", "missing bucket"),
        ("file://relative/path", "absolute path"),
    ],
)
def test_parse_uri_errors(text: str, message: str) -> None:
    with pytest.raises(InitializerError, match=message):
        parse_uri(text)


def test_sdk_style_environment() -> None:
    env = {
        "STORAGE_URI": "s3://bucket/data",
        "IGNORE_PATTERNS": "*.bin, *.pt,",
        "ALLOW_PATTERNS": "data/*",
        "ENDPOINT": "https://minio.local:9000/",
        "ACCESS_KEY_ID": "AKIA",
        "SECRET_ACCESS_KEY": "secret-value-123",
        "REGION": "eu-west-1",
        "OUTPUT_PATH": "",
    }
    cfg = load_config("dataset", env)
    assert cfg.ignore_patterns == ("*.bin", "*.pt")
    assert cfg.allow_patterns == ("data/*",)
    assert cfg.endpoint == "https://minio.local:9000"
    assert cfg.output_path == Path("/workspace/dataset")
    assert load_config("model", {"STORAGE_URI": "hf://a/b"}).output_path == Path("/workspace/model")
    assert "secret-value-123" not in redact("boom secret-value-123 boom")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "STORAGE_URI is not set"),
        ({"STORAGE_URI": "s3://bkt", "ACCESS_KEY_ID": "x"}, "both ACCESS_KEY_ID and SECRET_ACCESS_KEY"),
        ({"STORAGE_URI": "s3://bkt", "OUTPUT_PATH": "rel/path"}, "must be an absolute path"),
        ({"STORAGE_URI": "s3://bkt", "INIT_CONCURRENCY": "many"}, "not a number"),
    ],
)
def test_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(InitializerError, match=message):
        load_config("dataset", env)


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a/./b", "", "c:/x", "\\x"])
def test_traversal_refused(bad: str) -> None:
    with pytest.raises(InitializerError, match="refusing"):
        safe_relative(bad, "key")


def _files(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(p, 1, p, "v") for p in paths]


def test_model_default_filter_prefers_safetensors() -> None:
    cfg = load_config("model", {"STORAGE_URI": "hf://a/b"})
    files = _files(
        "config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack", "tf_model.h5"
    )
    kept, _ = apply_filters(cfg, files)
    assert [f.path for f in kept] == ["config.json", "model.safetensors"]
    kept, note = apply_filters(cfg, _files("config.json", "pytorch_model.bin", "x/opt.pt", "tf_model.h5"))
    assert [f.path for f in kept] == ["config.json", "pytorch_model.bin", "x/opt.pt"]
    assert "keeping .bin/.pt" in note
    # Explicit patterns replace the defaults; "dir/" means everything below it.
    cfg = load_config(
        "model", {"STORAGE_URI": "hf://a/b", "ALLOW_PATTERNS": "sub/", "IGNORE_PATTERNS": "*.md"}
    )
    kept, _ = apply_filters(cfg, _files("sub/a.bin", "sub/README.md", "top.bin"))
    assert [f.path for f in kept] == ["sub/a.bin"]


def test_redaction_of_registered_secrets() -> None:
    register_secret("hf_abcdefgh")
    assert redact("Authorization: Bearer hf_abcdefgh") == "Authorization: Bearer ***"


def test_progress_line() -> None:
    import io

    from pkg.initializers.progress import Progress

    progress = Progress(total_files=4, total_bytes=4 * 1024 * 1024, interval=60, stream=io.StringIO())
    progress.add_bytes(1024 * 1024)
    progress.file_done()
    line = progress.line()
    assert line.startswith("progress: 1/4 files, 1.0 MiB/4.0 MiB (25%), ")
    assert "MB/s, ETA " in line


def test_part_size_choice() -> None:
    from pkg.initializers.config import MiB, Tuning
    from pkg.initializers.transfer import choose_part_size

    def files(*sizes: int) -> list[RemoteFile]:
        return [RemoteFile(f"f{i}", s, f"f{i}", "v") for i, s in enumerate(sizes)]

    auto = Tuning(concurrency=16)
    assert choose_part_size(files(1000, 20 * MiB), auto) == 16 * MiB  # few large bytes: the floor
    assert choose_part_size(files(*[256 * MiB] * 4), auto) == 64 * MiB  # 1 GiB over 16 connections
    assert choose_part_size(files(*[100 * MiB] * 4), auto) == 25 * MiB
    assert choose_part_size(files(100 * 1024 * MiB), auto) == 64 * MiB  # the ceiling
    assert choose_part_size(files(*[256 * MiB] * 4), Tuning(part_size=8 * MiB)) == 8 * MiB  # as configured
