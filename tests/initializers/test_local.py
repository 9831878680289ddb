"""Local volumes (file:// and absolute paths), output-folder safety and disk-space errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.initializers.conftest import Runner, one_error_line, tree

KiB = 1024


def make_source(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b"{}",
        "weights/model.safetensors": os.urandom(600 * KiB),
        "données/é à.txt": b"ok",
        "empty": b"",
    }
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    return files


def test_copy_folder_and_file(run: Runner, tmp_path: Path) -> None:
    src = tmp_path / "volume"
    files = make_source(src)
    (src / "linked.json").symlink_to(src / "config.json")  # a symlinked file is copied as content
    out = tmp_path / "out"
    result = run("model", STORAGE_URI=f"file://{src}", OUTPUT_PATH=str(out))
    assert result.returncode == 0, result.stderr
    assert tree(out) == {**files, "linked.json": b"{}"}
    assert not (out / "linked.json").is_symlink()

    again = run("model", STORAGE_URI=f"file://{src}", OUTPUT_PATH=str(out))
    assert "already complete" in again.stdout

    single = tmp_path / "single"
    result = run("dataset", STORAGE_URI=str(src / "config.json"), OUTPUT_PATH=str(single))
    assert result.returncode == 0, result.stderr
    assert tree(single) == {"config.json": b"{}"}


def test_symlink_in_output_is_refused(run: Runner, tmp_path: Path) -> None:
    src = tmp_path / "volume"
    make_source(src)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").symlink_to(outside)  # planted link: writing weights/... would land outside
    result = run("model", STORAGE_URI=str(src), OUTPUT_PATH=str(out))
    assert result.returncode == 1
    assert "symlink" in one_error_line(result.stderr)
    assert list(outside.iterdir()) == []


def test_local_errors(run: Runner, tmp_path: Path) -> None:
    missing = run("dataset", STORAGE_URI="file:///no/such/volume", OUTPUT_PATH=str(tmp_path / "o"))
    assert missing.returncode == 1 and "does not exist" in one_error_line(missing.stderr)

    src = tmp_path / "volume"
    make_source(src)
    inside = run("dataset", STORAGE_URI=str(src), OUTPUT_PATH=str(src / "out"))
    assert inside.returncode == 1 and "contains OUTPUT_PATH" in one_error_line(inside.stderr)

    empty = tmp_path / "empty-volume"
    empty.mkdir()
    nothing = run("dataset", STORAGE_URI=str(empty), OUTPUT_PATH=str(tmp_path / "o2"))
    assert nothing.returncode == 1 and "nothing to download" in one_error_line(nothing.stderr)

    for uri, message in [("gs://bucket/x", "unsupported scheme"), ("hf://only-org", "missing repository")]:
        bad = run("dataset", STORAGE_URI=uri, OUTPUT_PATH=str(tmp_path / "o3"))
        assert bad.returncode == 1 and message in one_error_line(bad.stderr)
    unset = run("dataset", OUTPUT_PATH=str(tmp_path / "o3"))
    assert unset.returncode == 1 and "STORAGE_URI is not set" in one_error_line(unset.stderr)


def test_not_enough_space(run: Runner, tmp_path: Path) -> None:
    """A (sparse) source file larger than the free space fails up front with one line, writing nothing."""
    src = tmp_path / "volume"
    src.mkdir()
    huge = src / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(shutil.disk_usage(tmp_path).free * 2 + 1)
    out = tmp_path / "out"
    result = run("dataset", STORAGE_URI=str(src), OUTPUT_PATH=str(out))
    assert result.returncode == 1
    assert "not enough space" in one_error_line(result.stderr)
    assert not (out / "huge.bin").exists()


def test_no_space_mid_write_is_one_line() -> None:
    """ENOSPC during a write (not reproducible without a tiny filesystem) maps to the same advice."""
    import errno

    from pkg.initializers.transfer import _io_error

    message = str(_io_error(OSError(errno.ENOSPC, "No space left on device"), Path("/")))
    assert "no space left" in message and "larger volume" in message
