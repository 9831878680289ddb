"""Checkpoint save/load time and size: our sharded DCP checkpoints vs a full state dict gathered on rank 0.

    .venv/bin/python bench/bench_checkpoint.py                       # tiny + 60M models, 1 and 2 ranks
    .venv/bin/python bench/bench_checkpoint.py --quick --out /tmp/ckpt.json     # tiny model, 2 ranks

The baseline is what a user gets from the usual FSDP recipes (HF Trainer / Accelerate with
FULL_STATE_DICT): gather every trainable weight and the optimizer state on rank 0 and ``torch.save``
them; to load, every rank reads that file (``torch.load``) and keeps its own slice.
Ours: every rank writes its own shard (``pkg.trainer.checkpoint``).
Models are random Llama-style configs built in memory (no download), sharded with FSDP2 as the
trainer does; one optimizer step fills the AdamW state first.
Times are the median of ``--reps`` repetitions after an untimed round (a process's first DCP save pays
~0.3 s once), with the fastest and slowest; ratios are baseline / ours (higher is better for us). Each
save/load pair takes each place in the order in turn: on a shared machine what runs right after another
save is slowed by it. ``--stock`` adds ours with DCP's own storage (a ``torch.save`` archive per tensor,
checkpoint format 1, what this trainer wrote before ``pkg/trainer/checkpoint_storage.py``) side by side.

The cost of the file digests (pkg/trainer/checksums.py) is measured on the same checkpoints: ours saved with
digests vs the same save without them (no hashing as the shards are written, ``checksums.record`` patched to
record nothing), and
the load that verifies them vs the load of that checkpoint without digests; ratio = with / without. On a
shared machine those two medians can differ by more than the digests cost, so the time spent in the digest
step itself (``checksums.record`` at save, ``checksums.verify`` at load, on rank 0, waiting for the other
ranks included) is measured too, with its share of the save and of the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (64, 2, 4, 2, 128, 320),
    "60m": (512, 8, 8, 4, 1536, 32000),
}
METHODS = ("lora", "full")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _build(model_name: str, method: str):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = MODELS[model_name]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for layer in model.modules():
        if type(layer).__name__ == "LlamaDecoderLayer":
            fully_shard(layer)
    fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    trainable = sum(p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in params)
    return model, optimizer, trainable


class _NoDigest:
    """A hasher that hashes nothing: ours without digests, for their cost."""

    def update(self, data: object) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _clocked(fn: Callable, into: list[float]) -> Callable:
    """`fn`, adding the seconds each call takes to `into`."""

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    return run


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn) -> float:
    import torch.distributed as dist

    os.sync()  # the previous step's dirty pages are written now, not while this step is timed
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def worker(models: list[str], reps: int, workdir: Path, out: Path, stock: bool) -> None:
    from unittest import mock

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from pkg.trainer import checkpoint as ck
    from pkg.trainer import checkpoint_dirs, checksums

    class StockWriter(dcp.FileSystemWriter):
        digests: dict = {}  # noqa: RUF012  (none hashed while writing: checksums.record reads them back)

    def with_stock_storage(fn: Callable) -> Callable:
        """`fn` with DCP's own storage: a torch.save archive per tensor (checkpoint format 1)."""

        def run() -> None:
            with (
                mock.patch.object(ck.checkpoint_storage, "Writer", StockWriter),
                mock.patch.object(ck.checkpoint_storage, "Reader", dcp.FileSystemReader),
            ):
                fn()

        return run

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    load_opts = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, strict=False
    )
    fp = {"model": "bench"}
    rows = []
    for model_name in models:
        for method in METHODS:
            model, optimizer, trainable = _build(model_name, method)
            run_dir = workdir / f"{model_name}-{method}-{world}"
            baseline_file = run_dir / "full_state.pt"
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
            dist.barrier()

            def save_ours(model=model, optimizer=optimizer, run_dir=run_dir):
                ck.save_checkpoint(run_dir, 1, model, optimizer, None, fingerprint=fp, keep_last=1)

            def load_ours(model=model, optimizer=optimizer, run_dir=run_dir):
                ck.load_checkpoint(
                    checkpoint_dirs.latest_checkpoint(run_dir), model, optimizer, fingerprint=fp
                )

            def save_no_digests(model=model, optimizer=optimizer, run_dir=run_dir):
                # Neither the shards' hashing as they are written nor the digest step after.
                with (
                    mock.patch.dict(checksums.HASHERS, {checksums.ALGORITHM: _NoDigest}),
                    mock.patch.object(checksums, "record", lambda folder, hashed=None: {}),
                ):
                    save_ours(model, optimizer, run_dir)

            def save_full(model=model, optimizer=optimizer, baseline_file=baseline_file):
                msd, osd = get_state_dict(model, optimizer, options=full_opts)
                if rank == 0:
                    torch.save({"model": msd, "optim": osd}, baseline_file)

            def load_full(model=model, optimizer=optimizer, baseline_file=baseline_file):
                state = torch.load(baseline_file, weights_only=True)  # every rank reads it all
                set_state_dict(
                    model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                    options=load_opts,
                )  # fmt: skip

            names = ("save_ours", "load_ours", "save_no_digests", "load_no_digests", "save_full", "load_full")
            names += ("save_stock", "load_stock") if stock else ()
            times: dict[str, list[float]] = {name: [] for name in names}
            spent: dict[str, list[float]] = {"record": [], "verify": []}  # inside the digest steps
            clocked = [
                mock.patch.object(checksums, step, _clocked(getattr(checksums, step), spent[step]))
                for step in spent
            ]
            pairs = {  # each save, then the load of what it saved
                "ours": (("save_ours", save_ours), ("load_ours", load_ours)),
                "no_digests": (("save_no_digests", save_no_digests), ("load_no_digests", load_ours)),
                "full": (("save_full", save_full), ("load_full", load_full)),
            }
            if stock:
                pairs["stock"] = (
                    ("save_stock", with_stock_storage(save_ours)),
                    ("load_stock", with_stock_storage(load_ours)),
                )
            # An untimed round first: a process's first DCP save pays one-off costs (~0.3 s: imports, the
            # first collectives) that a training run pays once, not at each checkpoint. Ours goes first, so
            # rank 0's peak RSS growth is ours after its save, the baseline's what it needs beyond ours
            # (ru_maxrss only rises: a lower bound of its own growth).
            peak = {"before": _max_rss_mb()}
            for name in ("ours", "full"):
                for _, fn in pairs[name]:
                    _timed(fn)  # with its barriers: the baseline's load reads what rank 0 saved
                    peak.setdefault(name, _max_rss_mb())
            for patch in clocked:
                patch.start()
            order = list(pairs)
            for rep in range(reps):
                # What runs right after another save or load is slowed by it on this machine (up to 1.5x
                # measured, either way round), so each pair takes each place in turn.
                for name in order[rep % len(order) :] + order[: rep % len(order)]:
                    for step, fn in pairs[name]:
                        times[step].append(_timed(fn))
            for patch in clocked:
                patch.stop()
            if rank == 0:
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append(
                    {
                        "model": model_name, "method": method, "world_size": world,
                        "trainable_params": trainable,
                        "ours_bytes": _dir_bytes(checkpoint_dirs.latest_checkpoint(run_dir)),
                        "full_bytes": baseline_file.stat().st_size,
                        **{f"{k}_s": round(v, 4) for k, v in med.items()},
                        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
                        "save_rss_growth_ours_mb": round(peak["ours"] - peak["before"], 1),
                        "save_rss_growth_full_mb": round(peak["full"] - peak["ours"], 1),
                        "save_ratio": round(med["save_full"] / med["save_ours"], 2),
                        "load_ratio": round(med["load_full"] / med["load_ours"], 2),
                        "digest_save_ratio": round(med["save_ours"] / med["save_no_digests"], 3),
                        "digest_load_ratio": round(med["load_ours"] / med["load_no_digests"], 3),
                        "digest_record_s": round(statistics.median(spent["record"]), 4),
                        **(
                            {"stock_save_ratio": round(med["save_stock"] / med["save_ours"], 2),
                             "stock_load_ratio": round(med["load_stock"] / med["load_ours"], 2)}
                            if stock else {}
                        ),
                        "digest_verify_s": round(statistics.median(spent["verify"]), 4),
                    }
                )  # fmt: skip
                shutil.rmtree(run_dir, ignore_errors=True)
            del model, optimizer
            dist.barrier()
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.destroy_process_group()


def _hash_speeds(folder: Path, mib: int = 256) -> dict[str, float]:
    """MiB/s of checksums.file_digest over a file in the page cache: the one recorded (XXH3-128), the one of
    older checkpoints (sha256), and zlib's crc32 (a 32-bit check) for comparison."""
    import zlib

    from pkg.trainer import checksums

    path = folder / "hash-speed.bin"
    path.write_bytes(os.urandom(mib << 20))

    def crc32() -> None:
        with path.open("rb") as f:
            crc = 0
            while chunk := f.read(4 << 20):
                crc = zlib.crc32(chunk, crc)

    hashers = {name: (lambda name=name: checksums.file_digest(path, name)) for name in checksums.HASHERS}
    speeds = {}
    for name, fn in {**hashers, "crc32": crc32}.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        speeds[name] = round(mib / best)
    path.unlink()
    return speeds


def _markdown(columns: dict[str, Callable[[dict], str]], rows: list[dict]) -> str:
    """A markdown table: a column per {header: cell of a row}; the first two left-aligned, numbers right."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i < 2 else "--:" for i in range(len(columns))) + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def _spread(row: dict, name: str) -> str:
    """The median time of `name` and, in brackets, the fastest and slowest repetition."""
    times = row["times_s"][name]
    return f"{row[name + '_s']:.3f} s ({min(times):.2f}-{max(times):.2f})"


# Sizes, median times (range) and baseline/ours ratios of the medians (> 1: ours faster).
TABLE: dict[str, Callable[[dict], str]] = {
    "model": lambda r: r["model"],
    "method": lambda r: r["method"],
    "ranks": lambda r: str(r["world_size"]),
    "trainable": lambda r: f"{r['trainable_params']:,}",
    "ours MB": lambda r: f"{r['ours_bytes'] / 1e6:.2f}",
    "full MB": lambda r: f"{r['full_bytes'] / 1e6:.2f}",
    "save ours": lambda r: _spread(r, "save_ours"),
    "save full": lambda r: _spread(r, "save_full"),
    "save ratio": lambda r: f"{r['save_ratio']:.2f}x",
    "load ours": lambda r: _spread(r, "load_ours"),
    "load full": lambda r: _spread(r, "load_full"),
    "load ratio": lambda r: f"{r['load_ratio']:.2f}x",
    "rank-0 RSS growth on save, ours / full": lambda r: (
        f"{r['save_rss_growth_ours_mb']:.0f} / {r['save_rss_growth_full_mb']:.0f} MB"
    ),
}
# Save and load with the file digests vs without (> 1: what the digests cost).
DIGEST_TABLE: dict[str, Callable[[dict], str]] = {
    **{k: TABLE[k] for k in ("model", "method", "ranks", "ours MB")},
    "save with / without": lambda r: f"{r['save_ours_s']:.3f} / {r['save_no_digests_s']:.3f} s",
    "save ratio": lambda r: f"{r['digest_save_ratio']:.2f}x",
    "load with / without": lambda r: f"{r['load_ours_s']:.3f} / {r['load_no_digests_s']:.3f} s",
    "load ratio": lambda r: f"{r['digest_load_ratio']:.2f}x",
    "digest step at save (share)": lambda r: (
        f"{r['digest_record_s']:.3f} s ({r['digest_record_s'] / r['save_ours_s']:.0%})"
    ),
    "digest step at load (share)": lambda r: (
        f"{r['digest_verify_s']:.3f} s ({r['digest_verify_s'] / r['load_ours_s']:.0%})"
    ),
}


# Ours with DCP's stock storage vs ours (> 1: ours faster).
STOCK_TABLE: dict[str, Callable[[dict], str]] = {
    **{k: TABLE[k] for k in ("model", "method", "ranks")},
    "save, DCP storage": lambda r: _spread(r, "save_stock"),
    "save, ours": lambda r: _spread(r, "save_ours"),
    "save ratio": lambda r: f"{r['stock_save_ratio']:.2f}x",
    "load, DCP storage": lambda r: _spread(r, "load_stock"),
    "load, ours": lambda r: _spread(r, "load_ours"),
    "load ratio": lambda r: f"{r['stock_load_ratio']:.2f}x",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,60m", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--nproc", default="1,2", help="world sizes to run (torchrun --nproc-per-node)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 ranks, 2 repetitions")
    parser.add_argument(
        "--stock", action="store_true",
        help="also ours with DCP's own storage (a torch.save archive per tensor, checkpoint format 1)",
    )  # fmt: skip
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.nproc, args.reps = "tiny", "2", 2
    models = [m for m in args.models.split(",") if m]
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if args.worker:
        from pkg.trainer.distributed import exit_process

        worker(models, args.reps, args.workdir, args.worker, args.stock)
        exit_process(0)  # a normal exit can abort in gloo's threads

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        speeds = _hash_speeds(Path(tmp))
        for nproc in (int(n) for n in args.nproc.split(",")):
            result = Path(tmp) / f"rows-{nproc}.json"
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", __file__,
                "--models", ",".join(models), "--reps", str(args.reps),
                "--workdir", tmp, "--worker", str(result), *(["--stock"] if args.stock else []),
            ]  # fmt: skip
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)),
            }
            print(f"running {','.join(models)} x {','.join(METHODS)} at {nproc} rank(s)...", file=sys.stderr)
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=sys.stderr)
            rows += json.loads(result.read_text())
    print(
        "Checkpoint save and load on CPU: ours (`pkg.trainer.checkpoint`, every rank writes its own shard "
        "with torch.distributed.checkpoint) vs the usual full state dict gathered on rank 0 and "
        f"`torch.save`d (every rank `torch.load`s it back). Median of {args.reps} (fastest-slowest) after an "
        "untimed round; ratio = full / ours.\n"
    )
    print(_markdown(TABLE, rows))
    print(
        "\nThe file digests (XXH3-128 of every file, recorded at save, checked at load): ours with them vs "
        f"without. Median of {args.reps}; ratio = with / without.\n"
    )
    print(_markdown(DIGEST_TABLE, rows))
    if args.stock:
        print(
            "\nOurs with DCP's own storage (FileSystemWriter/Reader: a torch.save archive per tensor, the "
            f"checkpoint format before 2) vs ours. Median of {args.reps}; ratio = DCP's storage / ours.\n"
        )
        print(_markdown(STOCK_TABLE, rows))
    print(
        "\nchecksums.file_digest over 256 MiB in the page cache, best of 3: "
        + ", ".join(f"{k} {v} MiB/s" for k, v in speeds.items())
    )
    report = {
        "torch": __import__("torch").__version__,
        "cpus": os.cpu_count(),
        "reps": args.reps,
        "baseline": "full state dict gathered on rank 0 + torch.save; every rank torch.loads it",
        "rows": rows,
        "hash_mib_per_s": speeds,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
