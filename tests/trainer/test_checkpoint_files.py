"""Checkpoint bookkeeping that needs no process group: discovery, cleanup, resume paths, metrics, signals."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pkg.trainer import checkpoint as ck
from pkg.trainer import checkpoint_dirs, errors, rng
from pkg.trainer.fingerprint import fingerprint_mismatch, run_fingerprint
from pkg.trainer.resilience import EXIT_PREEMPTED, StopRequest

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


def _fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    path = output_dir / "checkpoints" / f"step-{step}"
    (path / "state").mkdir(parents=True)
    if complete:
        meta = {"format_version": ck.FORMAT_VERSION, "step": step, "complete": True}
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path):
    good = _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, complete=False)  # crashed before the marker
    (tmp_path / "checkpoints" / ".tmp-step-30" / "state").mkdir(parents=True)  # crashed mid-write
    (tmp_path / "checkpoints" / ".trash-step-5-1-2").mkdir()  # crashed mid-prune
    torn = _fake_checkpoint(tmp_path, 40, complete=False)
    (torn / "meta.json").write_text('{"step": 40, "compl')  # torn marker
    assert checkpoint_dirs.latest_checkpoint(tmp_path) == good
    assert [s for s, _ in checkpoint_dirs.list_checkpoints(tmp_path)] == [10]
    removed = {p.name for p in checkpoint_dirs.cleanup_incomplete(tmp_path)}
    assert removed == {"step-20", ".tmp-step-30", ".trash-step-5-1-2", "step-40"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10"]


def test_latest_is_by_step_number_not_name(tmp_path):
    for step in (9, 10, 100):
        _fake_checkpoint(tmp_path, step)
    assert checkpoint_dirs.latest_checkpoint(tmp_path).name == "step-100"
    assert checkpoint_dirs.latest_checkpoint(tmp_path / "nowhere") is None


def test_meta_step_must_match_folder(tmp_path):
    path = _fake_checkpoint(tmp_path, 7)
    path.rename(tmp_path / "checkpoints" / "step-8")  # a hand-copied folder with the wrong name
    assert checkpoint_dirs.latest_checkpoint(tmp_path) is None


def test_resolve_resume(tmp_path):
    assert checkpoint_dirs.resolve_resume(tmp_path, "auto") is None  # nothing yet: start fresh
    ckpt = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 2)
    for value in ("auto", "AUTO", True, "true"):
        assert checkpoint_dirs.resolve_resume(tmp_path, value) == ckpt
    for value in ("never", "false", False, "none", None):
        assert checkpoint_dirs.resolve_resume(tmp_path, value) is None
    assert checkpoint_dirs.resolve_resume("/elsewhere", str(ckpt)) == ckpt  # an explicit step folder
    assert checkpoint_dirs.resolve_resume("/elsewhere", str(tmp_path)) == ckpt  # another run's output_dir
    assert checkpoint_dirs.resolve_resume("/elsewhere", str(tmp_path / "checkpoints")) == ckpt
    with pytest.raises(errors.CheckpointError, match="is not a complete checkpoint"):
        checkpoint_dirs.resolve_resume(tmp_path, str(tmp_path / "missing"))


def test_fingerprint_mismatch_names_every_difference():
    saved = {"model": "a", "method": "lora", "dataset": "d1", "global_batch_size": 8}
    assert fingerprint_mismatch(saved, dict(saved)) is None
    why = fingerprint_mismatch(saved, {**saved, "method": "full", "global_batch_size": 16})
    assert why == (
        "global_batch_size: checkpoint has 8, this run has 16; "
        "method: checkpoint has 'lora', this run has 'full'"
    )


def test_fingerprint_covers_what_shapes_the_targets(tmp_path):
    """Resuming with another train_on_prompt would mix two losses in one run: the fingerprints differ."""
    from pkg.trainer.config import TrainConfig

    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    cfg = TrainConfig(model_dir=str(tmp_path / "model"), dataset_dir=str(tmp_path / "data"))
    other = TrainConfig(**{**cfg.to_dict(), "train_on_prompt": not cfg.train_on_prompt})
    why = fingerprint_mismatch(run_fingerprint(cfg), run_fingerprint(other))
    assert why and why.startswith("dataset: ") and "train_on_prompt" in why
    longer = TrainConfig(**{**cfg.to_dict(), "max_steps": 1000, "learning_rate": 1e-5})
    assert fingerprint_mismatch(run_fingerprint(cfg), run_fingerprint(longer)) is None
    # Later settings appear only when set, so checkpoints written before them still match.
    assert "dataset_split" not in run_fingerprint(cfg)["dataset"]
    changes = [{"dataset_split": "train[:10%]"}, {"column_map": {"input": "q"}}, {"system_prompt": "Hi"}]
    changes += [{"message_format": "llama3"}, {"prompt_template": "grammar"}, {"truncation": "none"}]
    changes += [{"add_eos": False}, {"empty_system_prompt": True}, {"alpaca_preamble": True}]
    for change in changes:
        other = TrainConfig(**{**cfg.to_dict(), **change})
        assert fingerprint_mismatch(run_fingerprint(cfg), run_fingerprint(other)).startswith("dataset")
    dora = TrainConfig(**{**cfg.to_dict(), "use_dora": True})
    assert "DoRA" in fingerprint_mismatch(run_fingerprint(cfg), run_fingerprint(dora))
    # A checkpoint of a trainer that chose or ordered the rows otherwise (SAMPLES_VERSION 1) is refused.
    older = {k: v for k, v in run_fingerprint(cfg).items() if k != "samples"}
    why = fingerprint_mismatch(older, run_fingerprint(cfg))
    assert why == (
        'samples: checkpoint has None, this run has "the trainer\'s choice and order of rows, version 2"'
    )


def test_rng_state_roundtrip():
    import random

    import numpy as np
    import torch

    state = rng.rng_state()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    rng.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_stop_request_on_sigterm():
    stop = StopRequest().install()
    try:
        assert not stop.requested and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop() and stop.received == signal.SIGTERM
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert EXIT_PREEMPTED == 143


def test_file_digests_name_their_algorithm_catch_one_flipped_bit_and_check_older_sha256_ones(tmp_path):
    from pkg.trainer import checksums

    shard = tmp_path / "state" / "__0_0.distcp"
    shard.parent.mkdir()
    shard.write_bytes(bytes(range(256)) * 40_000)  # over two read chunks: the chunks are joined right
    recorded = checksums.file_digest(shard)
    assert recorded.startswith("xxh3-128:") and len(recorded) == len("xxh3-128:") + 32
    (tmp_path / "empty").write_bytes(b"")
    assert (
        checksums.file_digest(tmp_path / "empty") == "xxh3-128:99aa06d3014798d86001c324468d497f"
    )  # XXH3-128("")
    older = checksums.file_digest(shard, "sha256")  # what trainers before XXH3 recorded
    assert older == "sha256:" + __import__("hashlib").sha256(shard.read_bytes()).hexdigest()
    checksums.verify(tmp_path, {"state/__0_0.distcp": recorded})
    checksums.verify(tmp_path, {"state/__0_0.distcp": older})
    body = bytearray(shard.read_bytes())
    body[6_000_000] ^= 0x01  # one bit, in the second chunk
    shard.write_bytes(bytes(body))
    for digest, algorithm in ((recorded, "xxh3-128"), (older, "sha256")):
        with pytest.raises(
            errors.CheckpointUnreadable, match=f"__0_0.distcp does not match the {algorithm} digest"
        ):
            checksums.verify(tmp_path, {"state/__0_0.distcp": digest})
    with pytest.raises(
        errors.CheckpointError, match=r"unknown kind \(md5\).*the trainer version that saved it"
    ):
        checksums.verify(tmp_path, {"state/__0_0.distcp": "md5:00"})


def test_tensors_stored_as_their_bytes_hashed_as_written_and_older_torch_save_entries_still_load(tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from pkg.trainer import checkpoint_storage, checksums

    def state() -> dict:
        g = torch.Generator().manual_seed(0)
        return {
            "w": torch.randn(6, 4, generator=g).t(),  # not contiguous: stored row-major
            "half": torch.randn(5, generator=g).to(torch.bfloat16),
            "step": torch.tensor(7.0),  # 0-d, as AdamW's step
            "ids": torch.arange(3),
            "lr": 0.5,  # not a tensor: DCP pickles it
        }

    def zeroed() -> dict:
        return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0.0 for k, v in state().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that there is no process group
        writer = checkpoint_storage.Writer(tmp_path / "new")
        dcp.save(state(), storage_writer=writer)
        loaded = zeroed()
        dcp.load(loaded, storage_reader=checkpoint_storage.Reader(tmp_path / "new"))
        with pytest.raises(dcp.api.CheckpointException) as refused:  # stock DCP refuses, never misreads
            dcp.load(zeroed(), storage_reader=dcp.FileSystemReader(tmp_path / "new"))
        assert "Unknown extension name='llm-trainer-raw'" in str(refused.value.failures)
        dcp.save(state(), storage_writer=dcp.FileSystemWriter(tmp_path / "old"))  # format 1
        older = zeroed()
        dcp.load(older, storage_reader=checkpoint_storage.Reader(tmp_path / "old"))
    for got in (loaded, older):
        for k, want in state().items():
            assert torch.equal(got[k], want) if isinstance(want, torch.Tensor) else got[k] == want, k
    shard = tmp_path / "new" / "__0_0.distcp"
    assert shard.stat().st_size < (tmp_path / "old" / "__0_0.distcp").stat().st_size / 2  # no archive each
    assert writer.digests == {"__0_0.distcp": checksums.file_digest(shard)}
