"""Checkpoint format, atomicity, keep_last, refusal and resharding on a toy FSDP2 model under real torchrun.

The same file is the torchrun worker (``python -m torch.distributed.run ... test_checkpoint.py MODE``):
a frozen Linear (the "base") followed by trainable Linears, each ``fully_shard``ed, AdamW, LambdaLR,
and input noise drawn from the global torch RNG so that exact loss equality also proves RNG restore.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8
FP = {"model": "toy-abc", "method": "lora", "dataset": "toy-data-1", "global_batch_size": GLOBAL_BATCH}


# --------------------------------------------------------------------------- the torchrun worker


def _build(seed: int = 0):
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 4),
    )
    model[0].requires_grad_(False)  # a frozen base layer, as with LoRA
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, step: int) -> float:
    """One optimizer step on a global batch fixed by ``step``, split across ranks; returns the global loss."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)
    x, y = x[rank::world], y[rank::world]
    x = x + 0.05 * torch.randn_like(x)  # global RNG: resumed losses match only if RNG states are restored
    sq = ((model(x) - y) ** 2).sum() / GLOBAL_BATCH
    (sq * world).backward()  # FSDP averages gradients over ranks: this makes it the global mean's gradient
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    loss = sq.detach().clone()
    dist.all_reduce(loss)
    return loss.item()


def _snapshot(model, optimizer, scheduler) -> dict:
    """Full (unsharded) trainable weights and optimizer state, gathered on every rank."""
    names = {p: n for n, p in model.named_parameters()}
    weights = {n: p.full_tensor().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad}
    optim = {}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            optim[f"{names[p]}.{k}"] = v.flatten().tolist()
    return {
        "weights": weights,
        "optim": optim,
        "last_epoch": scheduler.last_epoch,
        "lr": scheduler.get_last_lr(),
    }


def worker(mode: str, out: Path, workdir: Path) -> None:
    import torch.distributed as dist

    from pkg.trainer import checkpoint as ck
    from pkg.trainer import checkpoint_dirs, errors

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optimizer, scheduler = _build()
    result: dict = {"world_size": dist.get_world_size(), "losses": {}}

    if mode == "train":  # 6 steps, a checkpoint after steps 1, 2, 3 (keep_last 2), snapshot at 3
        for step in range(1, 7):
            result["losses"][step] = _step(model, optimizer, scheduler, step)
            if step <= 3:
                ck.save_checkpoint(
                    workdir, step, model, optimizer, scheduler,
                    fingerprint=FP, data_state={"next_step": step + 1}, keep_last=2,
                )  # fmt: skip
            if step == 3:
                result["snapshot"] = _snapshot(model, optimizer, scheduler)
    elif mode == "resume":  # refuse a foreign fingerprint, then load the newest and run steps 4..6
        try:
            ck.load_checkpoint(
                checkpoint_dirs.latest_checkpoint(workdir),
                model,
                optimizer,
                scheduler,
                fingerprint={**FP, "dataset": "other"},
            )
        except errors.CheckpointError as e:
            result["refused"] = str(e)
        try:  # a failing save raises the same one-line error on every rank and leaves nothing complete
            bad = {"x": object()}
            ck.save_checkpoint(workdir / "bad", 1, model, optimizer, fingerprint=FP, data_state=bad)
        except errors.CheckpointError as e:
            result["bad_save"] = str(e)
        node_local = workdir / f"node-{rank}"  # as if each node mounted its own volume
        result["shared"], result["node_local_shared"] = checkpoint_dirs.shared_by_all_ranks(workdir), None
        if dist.get_world_size() > 1:
            result["node_local_shared"] = checkpoint_dirs.shared_by_all_ranks(node_local)
            try:
                ck.save_checkpoint(node_local, 1, model, optimizer, fingerprint=FP)
            except errors.CheckpointError as e:
                result["node_local_save"] = str(e)
        resumed = ck.load_checkpoint(
            checkpoint_dirs.latest_checkpoint(workdir), model, optimizer, scheduler, fingerprint=FP
        )
        result["resumed_step"], result["data_state"] = resumed.step, resumed.data_state
        result["snapshot"] = _snapshot(model, optimizer, scheduler)
        for step in range(resumed.step + 1, 7):
            result["losses"][step] = _step(model, optimizer, scheduler, step)
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- launching


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRAINER_TEST_KILL_AT_STEP", None)
    return env


def _torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", __file__, *args,
    ]  # fmt: skip


def _torchrun(nproc: int, mode: str, out: Path, workdir: Path) -> dict:
    proc = subprocess.run(
        _torchrun_cmd(nproc, mode, str(out), str(workdir)),
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k


@pytest.fixture(scope="module")
def trained_at_2(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("ck2")
    return workdir, _torchrun(2, "train", workdir / "train.json", workdir)


def test_keep_last_and_layout(trained_at_2):
    from pkg.trainer import checkpoint_dirs

    workdir, _ = trained_at_2
    assert [s for s, _ in checkpoint_dirs.list_checkpoints(workdir)] == [2, 3]
    latest = checkpoint_dirs.latest_checkpoint(workdir)
    assert latest == workdir / "checkpoints" / "step-3"
    assert sorted(p.name for p in (latest / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert len(list((latest / "state").glob("*.distcp"))) == 2  # one shard file per rank
    assert not list((workdir / "checkpoints").glob(".*"))  # no temporary or trash folders left
    meta = checkpoint_dirs.read_meta(latest)
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["fingerprint"] == FP
    assert meta["data_state"] == {"next_step": 4} and meta["scheduler"]["last_epoch"] == 3


def test_only_trainable_weights_saved(trained_at_2):
    import torch.distributed.checkpoint as dcp

    workdir, _ = trained_at_2
    keys = dcp.FileSystemReader(str(workdir / "checkpoints" / "step-3" / "state")).read_metadata()
    keys = set(keys.state_dict_metadata)
    assert "model.2.weight" in keys and "model.4.bias" in keys
    assert not any(k.startswith("model.0.") for k in keys), keys  # frozen base layer not saved
    assert any(k.startswith("optim.state.2.weight") for k in keys), keys


@pytest.mark.parametrize("nproc", [2, 1])
def test_resume_same_and_other_world_size(trained_at_2, tmp_path, nproc):
    workdir, trained = trained_at_2
    resumed = _torchrun(nproc, "resume", tmp_path / "resume.json", workdir)
    assert resumed["resumed_step"] == 3 and resumed["data_state"] == {"next_step": 4}
    assert "dataset: checkpoint has 'toy-data-1', this run has 'other'" in resumed["refused"]
    assert "\n" not in resumed["refused"]
    assert "cannot complete checkpoint" in resumed["bad_save"] and "JSON" in resumed["bad_save"]
    from pkg.trainer import checkpoint_dirs

    assert checkpoint_dirs.latest_checkpoint(workdir / "bad") is None
    assert resumed["shared"] is True
    if nproc == 2:
        assert resumed["node_local_shared"] is False
        assert "is not shared by all ranks" in resumed["node_local_save"]

    snap, want = resumed["snapshot"], trained["snapshot"]
    _assert_same(snap["weights"], want["weights"])
    _assert_same(snap["optim"], want["optim"])
    assert snap["last_epoch"] == want["last_epoch"] and snap["lr"] == pytest.approx(want["lr"])
    for step in ("4", "5", "6"):
        if nproc == 2:  # same world size: identical continuation (RNG restored)
            assert resumed["losses"][step] == pytest.approx(trained["losses"][step], rel=1e-6)
        else:  # other world size: the noise draws differ, the losses are close
            assert resumed["losses"][step] == pytest.approx(trained["losses"][step], rel=0.1)


def test_reshard_1_to_2(tmp_path):
    trained = _torchrun(1, "train", tmp_path / "train.json", tmp_path)
    resumed = _torchrun(2, "resume", tmp_path / "resume.json", tmp_path)
    _assert_same(resumed["snapshot"]["weights"], trained["snapshot"]["weights"])
    _assert_same(resumed["snapshot"]["optim"], trained["snapshot"]["optim"])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
    from pkg.trainer.distributed import exit_process

    exit_process(0)  # as the trainer leaves: a normal exit can abort in gloo's threads
