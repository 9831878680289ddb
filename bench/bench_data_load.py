"""Reading a large dataset file: the trainer's loader (data_files.load_split) against `datasets.load_dataset`,
the reader a user (and torchtune) would otherwise call, side by side, each in a fresh process.

    .venv/bin/python bench/bench_data_load.py                  # 300k and 1M rows, JSON Lines and CSV
    .venv/bin/python bench/bench_data_load.py --pkg-root OLD   # OLD: another checkout's loader as `ours`

The rows are alpaca rows of varied text (~150 bytes). `ours` reads every value as written (a JSON Lines file
by pyarrow in one go; CSV cells as text); `datasets` types a file by its first 10 MiB and casts the rest.
jsonl-mixed: the last row's output is a list, which `datasets` reads as the string '[5]' and ours keeps (it
reads such a file in one piece through `datasets`, the slow path; the row check then refuses the row).
Reported: seconds from the call to the loaded rows (each loader with a fresh cache folder) and the peak RSS
of the process, best of --repeat runs; and ours / datasets.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys, time
tool, path, cache = sys.argv[1:4]
import datasets
datasets.disable_progress_bars()
start = time.perf_counter()
if tool == "ours":
    from pkg.trainer.data_files import load_split
    ds, _ = load_split(path, cache)
else:
    kind = "csv" if path.endswith(".csv") else "json"
    ds = datasets.load_dataset(kind, data_files={"train": [path]}, split="train", cache_dir=cache)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": len(ds), "s": seconds, "rss_mb": peak}))
"""


def write_rows(path: Path, n: int, late_list: bool = False) -> None:
    """n alpaca rows; `late_list`: the last one's output is the list [5] (a column of mixed kinds)."""
    rows = (
        {"instruction": f"Summarize item {i} in a word.", "input": "", "output": f"answer {i} " * (1 + i % 7)}
        if not (late_list and i == n - 1)
        else {"instruction": "x", "input": "", "output": [5]}
        for i in range(n)
    )
    with path.open("w", newline="") as f:
        if path.suffix == ".csv":
            writer = csv.writer(f)
            writer.writerow(["instruction", "input", "output"])
            writer.writerows([r["instruction"], r["input"], r["output"]] for r in rows)
        else:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def measure(tool: str, path: Path, work: Path, pkg_root: Path, repeat: int) -> dict:
    best, env = None, {**os.environ, "PYTHONPATH": str(pkg_root), "HF_HUB_OFFLINE": "1"}
    for k in range(repeat):
        cache = work / f"cache-{tool}-{k}"
        out = subprocess.run(
            [sys.executable, "-c", PROBE, tool, str(path), str(cache)],
            capture_output=True, text=True, check=True, cwd=pkg_root, env=env,
        )  # fmt: skip
        shutil.rmtree(cache, ignore_errors=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if best is None or result["s"] < best["s"]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="300000,1000000", help="comma-separated row counts")
    parser.add_argument("--formats", default="jsonl,jsonl-mixed,csv", help="jsonl-mixed: a list last")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100k rows, one run each")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--pkg-root", type=Path, default=REPO, help="checkout whose loader is `ours`")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeat = "100000", 1
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-data-load-"))
    work.mkdir(parents=True, exist_ok=True)
    figures = []
    print("| format | rows | MB | ours s | datasets s | ours / datasets | peak MB ours / datasets |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    try:
        for fmt in args.formats.split(","):
            for n in (int(x) for x in args.rows.split(",")):
                folder = work / f"{fmt}-{n}"
                folder.mkdir(exist_ok=True)
                path = folder / f"train.{fmt.split('-')[0]}"
                write_rows(path, n, late_list=fmt == "jsonl-mixed")
                ours = measure("ours", folder, work, args.pkg_root, args.repeat)
                theirs = measure("datasets", path, work, args.pkg_root, args.repeat)
                assert ours["rows"] == theirs["rows"] == n, (ours, theirs)
                size = path.stat().st_size / 1e6
                figures.append({"format": fmt, "rows": n, "mb": size, "ours": ours, "datasets": theirs})
                print(
                    f"| {fmt} | {n:,} | {size:.0f} | {ours['s']:.2f} | {theirs['s']:.2f} | "
                    f"{ours['s'] / theirs['s']:.2f} | {ours['rss_mb']:.0f} / {theirs['rss_mb']:.0f} |",
                    flush=True,
                )
                shutil.rmtree(folder)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
