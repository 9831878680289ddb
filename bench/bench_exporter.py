"""Benchmark the model exporter's S3 upload against `aws s3 sync` (the other direction of the initializers'
benchmark), side by side on local S3 servers.

    python3 -m venv /tmp/aws && /tmp/aws/bin/pip install awscli==1.46.3    # requirements/bench.txt's pin
    .venv/bin/python bench/bench_exporter.py --aws /tmp/aws/bin/aws --out .bench/exporter.json
    .venv/bin/python bench/bench_exporter.py --quick                         # smaller, ~1 min

Two folders (full / --quick): a model as the trainer writes one, 4 / 2 safetensors shards of 256 / 64 MiB
plus 20 small files (config, tokenizer); and 500 / 200 small files of 64 KiB (a dataset of many files,
where each request's own cost shows). Servers: moto (Python; its CPU bounds every client on 2 cores) and
`rclone serve s3` (Go). Each tool uploads to its own prefix with its defaults (ours: 16 parallel requests,
8 MiB parts, each body checked as the store allows (neither server verifies checksums: every ETag is
compared with the MD5 of what was sent), a manifest last; aws: 10 parallel requests, 8 MiB parts, a CRC32
header the servers do not check), as a child process of this one; the objects are deleted after each run.
Wall time gives MB/s, peak RSS is the child's process tree polled every 50 ms, CPU seconds its user +
system time, server CPU seconds the S3 server's over the run. With --repeat N the tools take turns N times
and each keeps its best (bench_initializers.take_turns). The objects' count and bytes are checked after
every run. Prints a markdown table with the ratio to `aws s3 sync`, writes JSON. INIT_* variables in the
environment are passed to ours (to try other settings than the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_initializers import Result, measure, server_cpu, take_turns, write_random  # noqa: E402

from tests.support.s3_server import S3Server, start_rclone_s3, start_s3_server  # noqa: E402

MiB = 1024 * 1024


def make_model(root: Path, shards: int, shard_size: int) -> tuple[int, int]:
    """A model folder (shards + small files); returns (files, bytes)."""
    for i in range(shards):
        write_random(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", shard_size)
    (root / "config.json").write_text('{"model_type": "llama"}')
    for i in range(19):
        (root / f"tokenizer_part_{i}.json").write_bytes(os.urandom(64 * 1024))
    files = list(root.iterdir())
    return len(files), sum(f.stat().st_size for f in files)


def make_small_files(root: Path, count: int) -> tuple[int, int]:
    """`count` files of 64 KiB in 10 folders, and a config.json (the exporter takes a folder that holds
    one as a model); returns (files, bytes)."""
    for i in range(count):
        path = root / f"part-{i % 10}" / f"{i:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(64 * 1024))
    (root / "config.json").write_text("{}")
    return count + 1, count * 64 * 1024 + 2


def uploaded(s3: S3Server, prefix: str) -> tuple[int, int]:
    """(objects, bytes) under prefix, without the exporter's manifest; then delete them all."""
    client = s3.client()
    count = total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket="bench", Key=obj["Key"])
            if ".model-exporter/" not in obj["Key"]:
                count += 1
                total += obj["Size"]
    return count, total


def run_one(case: str, tool: str, cmd: list[str], env: dict[str, str], s3: S3Server, expect: tuple[int, int],
            work: Path) -> Result:  # fmt: skip
    """One upload, timed; the objects (under the tool's prefix) counted, checked and deleted."""
    assert s3.process is not None
    log = work / f"{case}-{tool}.log".replace(" ", "-")
    before = server_cpu(s3.process.pid)
    seconds, rss, cpu, code = measure(cmd, env, log)
    served = server_cpu(s3.process.pid) - before
    objects, size = uploaded(s3, prefix_of(tool) + "/")
    ok = code == 0 and (objects, size) == expect
    if not ok:
        print(f"!! {case} / {tool}: exit {code}, {objects} objects, {size} bytes; {log}", file=sys.stderr)
    return Result(case, tool, round(seconds, 2), round(size / seconds / 1e6, 1), round(rss, 1), round(cpu, 2),
                  round(served, 2), objects, size, ok)  # fmt: skip


def prefix_of(tool: str) -> str:
    return tool.replace(" ", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--aws", default=shutil.which("aws", path=str(Path(sys.executable).parent)))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.aws or not Path(args.aws).exists():
        sys.exit("aws CLI not found: install awscli==1.46.3 (requirements/bench.txt) and pass --aws PATH")
    shards, shard_size, small = (2, 64 * MiB, 200) if args.quick else (4, 256 * MiB, 500)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-exporter-") as tmp:
        work = Path(tmp)
        folders = {
            "model": (work / "model", make_model(work / "model", shards, shard_size)),
            f"{small} files": (work / "small", make_small_files(work / "small", small)),
        }
        servers = {"moto": lambda: start_s3_server(), "rclone": lambda: start_rclone_s3(work / "rclone")}
        for kind, start in servers.items():
            with start() as s3:
                s3.client().create_bucket(Bucket="bench")
                base = {"PATH": os.environ["PATH"], "HOME": str(work), "AWS_EC2_METADATA_DISABLED": "true"}
                aws_env = {
                    **base,
                    "AWS_ACCESS_KEY_ID": s3.access_key_id,
                    "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
                    "AWS_DEFAULT_REGION": s3.region,
                }
                for name, (folder, expect) in folders.items():
                    ours_env = {**base, **s3.env(), "SOURCE_PATH": str(folder), "PYTHONPATH": str(REPO)}
                    ours_env["STORAGE_URI"] = f"s3://bench/{prefix_of('ours')}"
                    ours_env |= {k: v for k, v in os.environ.items() if k.startswith("INIT_")}  # tuning runs
                    to = f"s3://bench/{prefix_of('aws s3 sync')}"
                    aws = [args.aws, "s3", "sync", "--only-show-errors", str(folder), to, "--endpoint-url"]
                    aws.append(s3.endpoint)
                    tools = [
                        ("ours", [sys.executable, "-m", "pkg.model_exporter"], ours_env),
                        ("aws s3 sync", aws, aws_env),
                    ]
                    case = f"{name} {kind}"
                    results += take_turns(
                        case,
                        tools,
                        args.repeat,
                        lambda tool, cmd, env: run_one(case, tool, cmd, env, s3, expect, work),  # noqa: B023
                    )
    report(results, args.out, shards, shard_size, small)


def report(results: list[Result], out: Path | None, shards: int, shard_size: int, small: int) -> None:
    lines = [
        f"Upload of a model folder ({shards} x {shard_size // MiB} MiB safetensors + 20 small files) and of "
        f"{small} files of 64 KiB to a local S3 server; best of the repeats.",
        "",
        "| case | tool | seconds | MB/s | peak RSS MB | CPU s | server CPU s | vs aws s3 sync |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r.case, r.tool): r for r in results}
    for r in results:
        other = by.get((r.case, "aws s3 sync"))
        ratio = f"{other.seconds / r.seconds:.2f}x" if other and r.tool == "ours" else ""
        flag = "" if r.ok else " (FAILED)"
        cells = [
            r.case,
            r.tool + flag,
            r.seconds,
            r.mb_per_s,
            f"{r.peak_rss_mb:.0f}",
            r.cpu_s,
            r.server_cpu_s,
            ratio,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n".join(lines))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
