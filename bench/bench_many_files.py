"""Peak memory against the number of files: does it grow with the listing? (issue: 200k small S3 objects
must stay under 300 MB peak RSS.)

    .venv/bin/python bench/bench_many_files.py                          # 10k and 40k objects, ~2 min
    .venv/bin/python bench/bench_many_files.py --counts 20000,200000     # the full target (slow on 2 cores)

Each count is a prefix of tiny objects (64 bytes) served by `rclone serve s3` (a real S3 server that costs
about 1 CPU ms per GET); ours downloads it as a fresh child process, and its peak RSS (the process tree,
polled every 50 ms) is recorded, then `aws s3 sync` (when installed) on the smallest count, side by side.
The growth per 10k files between the smallest and the largest count is extrapolated to 200k files. With
--pkg-root another checkout's initializer is measured the same way (to compare before / after a change).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_initializers import measure, tally  # noqa: E402
from tests.support.s3_server import start_rclone_s3  # noqa: E402

TARGET_FILES, TARGET_MB = 200_000, 300


def write_objects(root: Path, count: int) -> str:
    """`count` tiny files under root/bench/many-COUNT/ (100 per folder); returns the prefix."""
    prefix = f"many-{count}"
    for i in range(count):
        folder = root / "bench" / prefix / f"{i // 100:05d}"
        if i % 100 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.json").write_bytes(b'{"n": %d, "pad": "%s"}' % (i, b"x" * 40))
    return prefix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10000,40000", help="comma-separated numbers of objects")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--pkg-root", type=Path, default=REPO, help="checkout whose initializer is measured")
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-many-files-"))
    rows: list[tuple[str, int, float, float, bool]] = []  # tool, files, seconds, peak MB, ok
    try:
        prefixes = {n: write_objects(work / "s3", n) for n in counts}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
        with start_rclone_s3(work / "s3") as s3:
            out = work / "out"
            for n in counts:
                env = {**base, **s3.env(), "PYTHONPATH": str(args.pkg_root), "OUTPUT_PATH": str(out)}
                env["STORAGE_URI"] = f"s3://bench/{prefixes[n]}"
                cmd = [sys.executable, "-P", "-m", "pkg.initializers.dataset"]  # -P: PYTHONPATH decides
                rows.append(("ours", n, *_run(cmd, env, out, n, work / f"ours-{n}.log")))
            if aws:
                n = counts[0]
                env = {
                    **base,
                    "AWS_ACCESS_KEY_ID": s3.access_key_id,
                    "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
                    "AWS_DEFAULT_REGION": s3.region,
                }
                cmd = [aws, "s3", "sync", "--only-show-errors", f"s3://bench/{prefixes[n]}", str(out)]
                cmd += ["--endpoint-url", s3.endpoint]
                rows.append(("aws s3 sync", n, *_run(cmd, env, out, n, work / f"aws-{n}.log")))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report(rows)


def _run(cmd: list[str], env: dict[str, str], out: Path, n: int, log: Path) -> tuple[float, float, bool]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds, rss, _cpu, code = measure(cmd, env, log)
    ok = code == 0 and tally(out)[0] == n
    if not ok:
        print(f"!! {cmd[0]} exit {code}, {tally(out)[0]} of {n} files; see {log}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {Path(cmd[0]).name:10} {n:8d} files {seconds:7.1f}s {rss:6.0f} MB", file=sys.stderr, flush=True)
    return round(seconds, 1), round(rss, 1), ok


def report(rows: list[tuple[str, int, float, float, bool]]) -> None:
    print("\n| tool | files | seconds | files/s | peak RSS MB | ok |")
    print("|---|---:|---:|---:|---:|---|")
    for tool, n, seconds, rss, ok in rows:
        print(f"| {tool} | {n} | {seconds:.1f} | {n / seconds:.0f} | {rss:.0f} | {ok} |")
    ours = [(n, rss) for tool, n, _, rss, _ in rows if tool == "ours"]
    if len(ours) >= 2:
        (n0, r0), (n1, r1) = ours[0], ours[-1]
        per_10k = (r1 - r0) / (n1 - n0) * 10_000
        at_target = r1 + per_10k * (TARGET_FILES - n1) / 10_000
        mark = "met" if at_target < TARGET_MB else "MISSED"
        print(
            f"\n- growth: {per_10k:.1f} MB per 10k files; extrapolated to {TARGET_FILES} files: "
            f"{at_target:.0f} MB (target under {TARGET_MB} MB: {mark})"
        )
    print(
        "\nPeak RSS is the whole process tree's, polled every 50 ms. Times are noisy on a shared machine; "
        "the memory figures are what this benchmark is for."
    )


if __name__ == "__main__":
    main()
