"""files.py: atomic files and folders, and the folder digest (pure, in-process: the fast tier)."""

from __future__ import annotations

import os

import pytest

from pkg.trainer.files import atomic_dir, atomic_file, dir_digest, remove_tree, write_atomic

pytestmark = pytest.mark.fast


def test_dir_digest_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text('{"hidden_size": 8}')
        (d / "sub" / "w.bin").write_bytes(b"\0" * 100)
    (a / ".cache" / "huggingface").mkdir(parents=True)
    (a / ".cache" / "huggingface" / "x.lock").write_text("download bookkeeping")
    assert dir_digest(a) == dir_digest(b)
    os.utime(b / "config.json", (0, 0))  # modification times do not count
    assert dir_digest(a) == dir_digest(b)
    (b / "config.json").write_text('{"hidden_size": 16}')
    assert dir_digest(a) != dir_digest(b)
    big_a = dir_digest(a, small_file_bytes=10)  # large files count by name and size only
    (a / "sub" / "w.bin").write_bytes(b"\1" * 100)
    assert dir_digest(a, small_file_bytes=10) == big_a
    (a / "sub" / "w.bin").write_bytes(b"\1" * 101)
    assert dir_digest(a, small_file_bytes=10) != big_a
    assert dir_digest(tmp_path / "missing") == "missing"
    skipped = dir_digest(a, skip_suffixes=(".bin",))
    (a / "sub" / "w.bin").write_bytes(b"\2" * 7)
    assert dir_digest(a, skip_suffixes=(".bin",)) == skipped


def test_write_atomic_replaces_whole(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_file_keeps_the_old_content_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.pt"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.pt"]


def test_atomic_dir_replaces_or_keeps(tmp_path):
    final = tmp_path / "adapter"
    for content in ("one", "two"):
        with atomic_dir(final) as tmp:
            (tmp / "w").write_text(content)
    assert (final / "w").read_text() == "two" and os.listdir(tmp_path) == ["adapter"]
    with atomic_dir(final, keep_existing=True) as tmp:  # another node was first: its copy stays
        (tmp / "w").write_text("three")
    assert (final / "w").read_text() == "two" and os.listdir(tmp_path) == ["adapter"]
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "w").write_text("torn")
        raise RuntimeError("crash")
    assert (final / "w").read_text() == "two" and os.listdir(tmp_path) == ["adapter"]
    remove_tree(final)
    assert os.listdir(tmp_path) == []
