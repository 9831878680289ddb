"""Faults that must never end in exit 0 with a wrong result: each stops with one line naming the cause and
the fix, or recovers (issue 21). Missing weights, dropped data files, vocabulary mismatches, NaN, two jobs
on one output_dir, a full disk, a damaged checkpoint, Ctrl-C, a LoRA on a tied head merged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pkg.trainer import checkpoint_dirs, data_files, disk_space, model, output_lock
from pkg.trainer.config import ConfigError, TrainConfig, load_config
from pkg.trainer.errors import TrainerError
from pkg.trainer.metrics import Metrics
from tests.trainer.conftest import BASE_ARGS, LOGITS_TOL, PYTHON, cli, finish, run_trainer, start, trainer_env
from tests.trainer.test_errors import one_line_error
from tests.trainer.tiny import rows

# ------------------------------------------------------------------ weights


def without(model_dir: Path, dest: Path, name: str) -> Path:
    """A copy of `model_dir` whose checkpoint lacks the tensor `name`."""
    shutil.copytree(model_dir, dest)
    weights = load_file(str(dest / "model.safetensors"))
    del weights[name]
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.fast
def test_a_weight_missing_from_the_checkpoint_is_refused_loaded_or_streamed(tmp_path, tiny_model):
    lacking = without(tiny_model, tmp_path / "m", "model.layers.1.mlp.down_proj.weight")
    cfg = TrainConfig(model_dir=str(lacking), method="full")
    with pytest.raises(
        TrainerError, match=r"has no weight model\.layers\.1\.mlp\.down_proj\.weight.*download"
    ):
        model.load_model(cfg, torch.device("cpu"))  # one process, and rank 0's fallback at N processes
    # At N processes rank 0 plans the stream; a tensor it lacks makes it read with load_model (above).
    _, sources = model.load_model_on_meta(cfg, plan=True)
    assert isinstance(sources, str) and "down_proj" in sources


@pytest.mark.fast
def test_config_and_weights_of_different_shapes_name_the_weight(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(TrainerError, match=r"mlp\.\w+_proj\.weight has shape \[\d+, \d+\] in the checkpoint"):
        model.load_model(TrainConfig(model_dir=str(tmp_path / "m"), method="full"), torch.device("cpu"))


@pytest.mark.fast
def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    config.vocab_size = 300  # the tokenizer has 320
    with torch.device("meta"):  # as every rank builds it at world size > 1
        net = AutoModelForCausalLM.from_config(config)
    tokenizer = model.load_tokenizer(str(tiny_model))
    with pytest.raises(TrainerError, match="tokenizer has 320 tokens, the model's embedding only 300 rows"):
        model.check_vocabulary(net, tokenizer, str(tiny_model))


# ------------------------------------------------------------------ data files


def test_every_data_file_is_used_and_counted(tmp_path, caplog):
    import datasets

    r = rows("alpaca", 40)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r[:10]))
    (tmp_path / "train2.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r[10:20]))
    datasets.Dataset.from_list(r[20:30]).to_csv(str(tmp_path / "more.csv"), index=False)
    datasets.Dataset.from_list(r[30:40]).to_parquet(str(tmp_path / "rest.parquet"))
    (tmp_path / "test.jsonl").write_text(json.dumps({**r[0], "output": "TEST SPLIT"}) + "\n")
    (tmp_path / "README.md").write_text("# a dataset card\n")
    with caplog.at_level("INFO"):
        ds = data_files.load_rows(str(tmp_path), str(tmp_path / ".cache"))
    assert sorted(ds["instruction"]) == sorted(x["instruction"] for x in r)
    assert "TEST SPLIT" not in ds["output"]
    assert "more.csv 10, rest.parquet 10, train.jsonl 10, train2.jsonl 10" in caplog.text
    assert "not used (another split than train): test.jsonl (test)" in caplog.text
    assert "not read (not a data file for dataset_source auto): README.md" in caplog.text


@pytest.mark.fast
def test_unreadable_data_files_are_named_with_their_line(tmp_path):
    import datasets

    def refused(files: dict[str, bytes | list]) -> str:
        folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for name, content in files.items():
            if isinstance(content, bytes):
                (folder / name).write_bytes(content)
            else:
                datasets.Dataset.from_list(content).to_parquet(str(folder / name))
        with pytest.raises(TrainerError) as caught:
            data_files.load_rows(str(folder), str(tmp_path / ".cache"))
        return str(caught.value)

    good = b'{"instruction": "a", "output": "b"}\n'
    assert "has no rows (its files are empty)" in refused({"train.jsonl": b""})
    assert "has no rows" in refused({"train.jsonl": b"\n\n  \n"})
    err = refused({"train.jsonl": good + b'{"instruction": bad}\n'})
    assert "train.jsonl: line 2 is not valid JSON" in err
    err = refused({"train.jsonl": good + b'{"instruction": "caf\xe9", "output": "b"}\n'})
    assert "train.jsonl line 2: bytes that are not UTF-8" in err
    err = refused({"train-0.parquet": rows("alpaca", 3), "train-1.parquet": rows("text", 3)})
    assert "train-1.parquet has columns text but" in err and "train-0.parquet has instruction" in err


# ------------------------------------------------------------------ NaN


@pytest.mark.fast
def test_non_finite_numbers_are_refused_in_the_config():
    for value in ("nan", "inf"):
        with pytest.raises(ConfigError, match=f"learning_rate must be a finite number, got {value}"):
            load_config(["--learning_rate", value])
    with pytest.raises(ConfigError, match="nan_policy: 'ignore' is not one of stop, skip_step"):
        load_config(["--nan_policy", "ignore"])


def test_metrics_and_summary_stay_valid_json_with_nan(tmp_path):
    metrics = Metrics(tmp_path, 2, enabled=True)
    metrics.train_step(1, 2.5, 1e-3, 1.0, 10.0)
    metrics.train_step(2, float("nan"), 1e-3, float("inf"), 10.0)
    summary = metrics.finish({"note": float("nan")})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert written["final_loss"] is None and written["note"] is None and summary == written


def test_nan_stops_the_run_and_skip_step_skips_only_that_update(
    in_process, tmp_path, tiny_model, alpaca_data, capsys, monkeypatch
):
    # A learning rate of 1e30 makes every weight huge after step 1: the loss of step 2 is NaN.
    args = {"model_dir": tiny_model, "dataset_dir": alpaca_data, "learning_rate": 1e30, "save_every": 2}
    assert in_process({**args, "output_dir": tmp_path / "stop"}) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "step 2: loss=nan grad_norm=nan: not finite" in err and "nan_policy: stop" in err
    assert not (tmp_path / "stop" / "adapter").exists() and not (tmp_path / "stop" / "summary.json").exists()
    assert in_process({**args, "output_dir": tmp_path / "skip", "nan_policy": "skip_step"}) == 1
    assert "not finite for 5 steps in a row" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "skip" / "adapter").exists()

    # One bad batch (its loss made NaN, as a real overflow would): that update alone is skipped.
    from pkg.trainer.sft import SFT

    loss_sum, calls = SFT.loss_sum, []

    def poisoned(self, model, batch):
        calls.append(1)
        loss, aux = loss_sum(self, model, batch)
        return (loss * float("nan") if len(calls) == 5 else loss), aux  # the first micro-batch of step 2

    monkeypatch.setattr(SFT, "loss_sum", poisoned)
    out = tmp_path / "one"
    assert in_process({**args, "learning_rate": 1e-2, "output_dir": out, "nan_policy": "skip_step"}) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in records if "loss" in r] == [False, True] + [False] * 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8
    assert all(
        torch.isfinite(t).all() for t in load_file(str(out / "adapter/adapter_model.safetensors")).values()
    )


# ------------------------------------------------------------------ output_dir lock


@pytest.fixture
def short_lease(monkeypatch):
    monkeypatch.setattr(output_lock, "LEASE_S", 0.4)


def write_lock(folder: Path, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lock = {"host": "node-a", "pid": 4242, "token": "other", "renewed": time.time(), "lease_s": 0.4, **holder}
    (folder / output_lock.NAME).write_text(json.dumps(lock))


@pytest.mark.fast
def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, short_lease, caplog):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:  # a live process of this host holds it, renewed now
        write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid)
        with pytest.raises(
            TrainerError,
            match=rf"in use by another job \(host {socket.gethostname()}, pid "
            rf"{sleeper.pid}, lock .* renewed 0 s ago\): give this job its own output_dir",
        ):
            output_lock.OutputLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with caplog.at_level("INFO"):  # now its process is gone: taken over at once
        lock = output_lock.OutputLock(tmp_path).acquire()
        assert "taking over the lock of host" in caplog.text and "whose process is gone" in caplog.text
        assert json.loads((tmp_path / output_lock.NAME).read_text())["token"] == lock.token
        lock.release()
    assert not (tmp_path / output_lock.NAME).exists()
    write_lock(tmp_path, renewed=time.time() - 3600)  # another node, renewed an hour ago
    output_lock.OutputLock(tmp_path).acquire().release()


@pytest.mark.fast
def test_lock_of_another_node_is_watched_for_one_lease(tmp_path, short_lease):
    write_lock(tmp_path)  # fresh by the clock, but nobody renews it: taken over after one lease
    started = time.monotonic()
    output_lock.OutputLock(tmp_path).acquire().release()
    assert time.monotonic() - started >= 0.4
    write_lock(tmp_path)
    stop = threading.Event()

    def renew():  # the other node's job is alive
        while not stop.wait(0.1):
            write_lock(tmp_path)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        with pytest.raises(TrainerError, match=r"in use by another job \(host node-a, pid 4242"):
            output_lock.OutputLock(tmp_path).acquire()
    finally:
        stop.set()
        thread.join()


@pytest.mark.fast
def test_a_job_whose_lock_was_taken_over_learns_it(tmp_path, short_lease):
    lock = output_lock.OutputLock(tmp_path).acquire()
    renewed = json.loads((tmp_path / output_lock.NAME).read_text())["renewed"]
    time.sleep(0.3)
    assert json.loads((tmp_path / output_lock.NAME).read_text())["renewed"] > renewed  # the lease is kept
    write_lock(tmp_path)
    time.sleep(0.3)
    assert "another job (host node-a, pid 4242) took over the lock" in lock.lost()
    lock.release()
    assert (tmp_path / output_lock.NAME).exists()  # the other job's: left alone


def test_a_second_job_on_a_busy_output_dir_stops_in_one_line_and_ctrl_c_checkpoints(
    tmp_path, tiny_model, alpaca_data
):
    out = tmp_path / "out"
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "output_dir": out}
    slow = trainer_env(TRAINER_TEST_STEP_SLEEP="1")  # the first job is still training when the second starts
    first_args = {**args, "max_steps": 60, "save_every": 100}
    first = start([PYTHON, "-m", "tests.trainer.faulty_trainer", *cli(first_args)], slow)
    try:
        for _ in range(600):  # until the first job holds the lock
            if (out / output_lock.NAME).exists():
                break
            time.sleep(0.1)
        second = finish(start([PYTHON, "-m", "pkg.trainer", *cli(args)], trainer_env()), 240)
        assert second.returncode == 1
        err = one_line_error(second.stderr)
        assert (
            f"output_dir {out} is in use by another job (host {socket.gethostname()}, pid {first.pid}" in err
        )
        metrics = out / "metrics.jsonl"
        for _ in range(1200):  # until it trains (Ctrl-C during setup is one line and 130, no checkpoint)
            if metrics.exists() and '"loss"' in metrics.read_text():
                break
            time.sleep(0.1)
        first.send_signal(signal.SIGINT)  # Ctrl-C: like SIGTERM, a checkpoint at the step boundary
        done = finish(first, 240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert done.returncode == 143, done.stderr[-2000:]
    line = one_line_error(done.stderr)
    assert line.startswith("error: stopped by SIGINT after step") and "checkpoint saved" in line, line
    [(stopped, _)] = checkpoint_dirs.list_checkpoints(out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 1)) and not (out / output_lock.NAME).exists()


# ------------------------------------------------------------------ checkpoints and disk space


@pytest.fixture
def saved_at_2_and_4(in_process, tmp_path, tiny_model, alpaca_data):
    """A one-process run of 4 steps with checkpoints at steps 2 and 4: (its arguments, step 4's shard)."""
    args = {"model_dir": tiny_model, "dataset_dir": alpaca_data, "save_every": 2, "max_steps": 4}
    args["output_dir"] = out = tmp_path / "out"
    assert in_process(args) == 0
    [shard, *_] = sorted((out / "checkpoints" / "step-4" / "state").glob("*.distcp"))
    return args, shard


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(in_process, saved_at_2_and_4, capsys):
    args, shard = saved_at_2_and_4
    out = args["output_dir"]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert in_process({**args, "max_steps": 6}) == 0
    log = capsys.readouterr().out
    assert f"checkpoint {out}/checkpoints/step-4 is damaged ({shard} has 100 bytes where" in log
    assert "resuming from step 2 of 6" in log
    assert (out / "checkpoints" / "corrupt-step-4").is_dir()
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-4", "step-6"]


def overwrite(path: Path) -> None:
    """Damage a file in place: its size stays, so only its digest or loading it can tell."""
    body = path.read_bytes()
    path.write_bytes(b"\0" * 64 + body[64:])


def flip_a_byte(shard: Path) -> None:
    """One byte changed in the middle of the largest tensor a DCP shard holds: without its digest that
    shard still loads, into wrong weights."""
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(shard.parent)).read_metadata().storage_data.values()
    where = max((s for s in stored if s.relative_path == shard.name), key=lambda s: s.length)
    body = bytearray(shard.read_bytes())
    body[where.offset + where.length // 2] ^= 0xFF
    shard.write_bytes(bytes(body))


def as_saved_before_digests(checkpoint: Path) -> None:
    """The checkpoint as a trainer from before checksums.py wrote it: no digests, and format 1, where each
    tensor is a torch.save archive of its own (DCP's stock format), so damaged bytes fail to load."""
    import io
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from pkg.trainer import checkpoint_dirs

    state = checkpoint / "state"
    metadata = pickle.loads((state / ".metadata").read_bytes())
    files: dict[str, bytes] = {}
    shards: dict[str, bytearray] = {}
    for index, info in sorted(metadata.storage_data.items(), key=lambda e: (e[1].relative_path, e[1].offset)):
        body = files.setdefault(info.relative_path, (state / info.relative_path).read_bytes())
        data = body[info.offset : info.offset + info.length]
        if info.transform_descriptors:  # raw tensor bytes: as a torch.save archive
            tensor_meta = metadata.state_dict_metadata[index.fqn]
            chunk = next(c for c in tensor_meta.chunks if c.offsets == index.offset)
            dtype = tensor_meta.properties.dtype
            tensor = torch.frombuffer(bytearray(data), dtype=dtype).reshape(chunk.sizes)
            archive = io.BytesIO()
            torch.save(tensor.clone(), archive)
            data = archive.getvalue()
        shard = shards.setdefault(info.relative_path, bytearray())
        metadata.storage_data[index] = _StorageInfo(info.relative_path, len(shard), len(data))
        shard += data
    for name, shard in shards.items():
        (state / name).write_bytes(bytes(shard))
    (state / ".metadata").write_bytes(pickle.dumps(metadata))
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["digests"]
    meta.update(format_version=1, files=checkpoint_dirs.file_sizes(checkpoint))
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_that_fails_to_load_falls_back_to_the_previous_one(in_process, saved_at_2_and_4, capsys):
    args, shard = saved_at_2_and_4
    out = args["output_dir"]
    as_saved_before_digests(out / "checkpoints" / "step-4")
    overwrite(shard)  # older checkpoints: only loading finds the damage
    capsys.readouterr()
    assert in_process({**args, "max_steps": 6}) == 0
    log = capsys.readouterr().out
    assert f"checkpoint {out}/checkpoints/step-4 has no file digests (saved before they were recorded)" in log
    assert (
        f"checkpoint {out}/checkpoints/step-4 is damaged ({out}/checkpoints/step-4/state cannot be read"
        in log
    )
    assert "resuming from step 2 of 6" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["corrupt-step-4", "step-4", "step-6"]
    # The only checkpoint unreadable: moved aside, and the run stops rather than train half-loaded weights.
    shutil.rmtree(out / "checkpoints" / "step-4")
    overwrite(out / "checkpoints" / "step-6" / "rng" / "rank-00000.pt")
    capsys.readouterr()
    assert in_process({**args, "max_steps": 8}) == 1
    line = one_line_error(capsys.readouterr().err)
    assert (
        f"checkpoint {out}/checkpoints/step-6 is damaged ({out}/checkpoints/step-6/rng/rank-00000.pt "
        "does not match the xxh3-128 digest recorded when it was saved)" in line
    )
    assert "no older complete checkpoint is left" in line and "rerun the job to start over" in line, line
    assert (out / "checkpoints" / "corrupt-step-6").is_dir() and not (out / "checkpoints" / "step-6").exists()


def test_at_two_processes_a_flipped_byte_or_one_ranks_unreadable_shard_makes_every_rank_fall_back(
    tmp_path, tiny_model, alpaca_data
):
    out = tmp_path / "out"
    args = {**BASE_ARGS, "model_dir": tiny_model, "dataset_dir": alpaca_data, "output_dir": out}
    args.update(save_every=1, keep_last=3, max_steps=4, method="full")
    result = run_trainer(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    state = out / "checkpoints" / "step-{}" / "state" / "__1_0.distcp"  # rank 1's optimizer and weights
    flip_a_byte(Path(str(state).format(4)))  # caught by its digest
    as_saved_before_digests(out / "checkpoints" / "step-3")  # an older checkpoint, without digests:
    overwrite(Path(str(state).format(3)))  # fails to load on rank 1
    result = run_trainer({**args, "max_steps": 6}, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert (
        f"checkpoint {out}/checkpoints/step-4 is damaged ({str(state).format(4)} does not match the xxh3-128 "
        "digest recorded when it was saved)" in log
    )
    assert (
        f"checkpoint {out}/checkpoints/step-3 is damaged ({out}/checkpoints/step-3/state cannot be read"
        in log
    )
    assert "resuming from step 2 of 6" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "corrupt-step-3", "corrupt-step-4", "step-4", "step-5", "step-6"
    ]  # fmt: skip


@pytest.mark.fast
def test_space_problem_names_needed_and_free(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    assert disk_space.space_problem(tmp_path, 1, "x") is None
    err = disk_space.space_problem(tmp_path, free * 4, "the checkpoint of step 3", " (keep_last 2)")
    assert err.startswith("the checkpoint of step 3 needs ~") and " free (keep_last 2): free space" in err


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (needs root and mount); the test is skipped otherwise."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_in_one_line(in_process, tmp_path, tiny_model, alpaca_data, capsys):
    args = {"model_dir": tiny_model, "dataset_dir": alpaca_data, "method": "full", "save_every": 2}
    with tmpfs(tmp_path / "small", "size=3m") as small:
        # A full-weight checkpoint (~1.8 MB) does not fit twice with the tokenized cache in 3 MB.
        assert in_process({**args, "output_dir": small / "out"}) == 1
        err = one_line_error(capsys.readouterr().err)
        assert "needs ~" in err and "free" in err and "keep_last: 2" in err, err
        shutil.rmtree(small / "out")
        (small / "ballast").write_bytes(b"\0" * (shutil.disk_usage(small).free - 4096))  # full while writing
        assert in_process({**args, "output_dir": small / "out2"}) == 1
        err = one_line_error(capsys.readouterr().err)
        assert "No space left on device" in err or "no space left" in err, err
    with tmpfs(tmp_path / "ro", "size=1m,ro") as read_only:
        assert in_process({**args, "output_dir": read_only / "out"}) == 1
        assert "is not writable (Read-only file system)" in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------ Ctrl-C, the tied head, output_dir


@pytest.mark.fast
def test_ctrl_c_is_a_stop_request_like_sigterm():
    from pkg.trainer.resilience import StopRequest

    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.describe() == "SIGINT"
    finally:
        stop.uninstall()


def test_lora_on_a_tied_head_merges_exactly(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pkg.trainer import export
    from tests.trainer.test_export import lora_model, make_model

    model_dir = make_model(tmp_path / "base", tied=True)
    net = lora_model(model_dir, ["q_proj", "lm_head"])
    adapter = export.save_adapter(net, {k: v.detach().clone() for k, v in net.state_dict().items()},
                                  tmp_path / "out" / "adapter")  # fmt: skip
    export.save_merged(net, adapter, str(model_dir), tmp_path / "out" / "model")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
    ids = torch.tensor([[0, 5, 17, 99, 200, 31, 7]])
    with torch.no_grad():
        want, got = tuned(ids).logits, merged(ids).logits
        with tuned.disable_adapter():
            plain = tuned(ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, **LOGITS_TOL)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight


def test_output_dir_problems_are_one_line(in_process, tmp_path, tiny_model, alpaca_data, capsys):
    args = {"model_dir": tiny_model, "dataset_dir": alpaca_data}
    (tmp_path / "file").write_text("x")
    assert in_process({**args, "output_dir": tmp_path / "file"}) == 1
    assert "is a file, not a folder" in one_line_error(capsys.readouterr().err)
    assert in_process({**args, "output_dir": tiny_model / "out"}) == 1
    assert f"is inside model_dir {tiny_model}" in one_line_error(capsys.readouterr().err)
    assert in_process({**args, "output_dir": alpaca_data}) == 1
    assert "is inside dataset_dir" in one_line_error(capsys.readouterr().err)
    assert not (tiny_model / "out").exists()
    assert in_process({**args, "max_steps": 1, "config": tmp_path}) == 2
    assert "is a folder: give the YAML file itself" in one_line_error(capsys.readouterr().err)
    (tmp_path / "job.yaml").write_text("max_steps: 1\nmethod: full\nmax_steps: 2\n")
    assert in_process({**args, "config": tmp_path / "job.yaml"}) == 2
    assert "key 'max_steps' is given twice (line 3)" in one_line_error(capsys.readouterr().err)


@pytest.mark.fast
def test_tune_run_values_lose_their_quotes_the_same_way():
    from pkg.trainer import tune

    argv = ["run", "lora_finetune_single_device", "--config", "llama3_2/1B_lora"]
    quoted = ['dataset.new_system_prompt="Answer briefly."', "optimizer.lr='1e-4'", 'seed="7', "x=''"]
    assert tune.parse_command([*argv, *quoted]).overrides == {
        "dataset.new_system_prompt": "Answer briefly.",
        "optimizer.lr": "1e-4",
        "seed": '"7',  # not a pair of quotes: kept (and refused as an integer later)
        "x": "",
    }


def test_missing_weight_and_vocabulary_at_two_processes(tmp_path, tiny_model, alpaca_data):
    """At world size 2 rank 0 streams the weights into the shards (or reads them when it cannot) and the
    embedding may be split by vocabulary: both faults still stop every rank with one line."""
    from tests.trainer.conftest import run_trainer

    lacking = without(tiny_model, tmp_path / "lacking", "model.layers.1.mlp.down_proj.weight")
    small = tmp_path / "small"
    shutil.copytree(tiny_model, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    weights = load_file(str(small / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:300].clone()
    save_file(weights, str(small / "model.safetensors"), metadata={"format": "pt"})
    base = {**BASE_ARGS, "dataset_dir": alpaca_data, "method": "full", "vocab_parallel": "always"}
    for model_dir, expected in (
        (lacking, "has no weight model.layers.1.mlp.down_proj.weight"),
        (small, "the tokenizer has 320 tokens, the model's embedding only 300 rows"),
    ):
        result = run_trainer(
            {**base, "model_dir": model_dir, "output_dir": tmp_path / f"out-{model_dir.name}"}, nproc=2
        )
        assert result.returncode != 0
        assert expected in one_line_error(result.stderr, torchrun=True)


def test_a_model_without_tokenizer_files_leaves_nothing_behind(
    in_process, tmp_path, tiny_model, alpaca_data, capsys
):
    shutil.copytree(tiny_model, tmp_path / "m", ignore=shutil.ignore_patterns("tokenizer*"))
    out = tmp_path / "out"
    assert in_process({"model_dir": tmp_path / "m", "dataset_dir": alpaca_data, "output_dir": out}) == 1
    assert "has no tokenizer files (none of tokenizer.json" in one_line_error(capsys.readouterr().err)
    assert list(out.iterdir()) == []  # no config.yaml, no cache/, no lock
