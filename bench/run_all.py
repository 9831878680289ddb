"""Run every benchmark in bench/ and write docs/benchmarks.md (`make bench`).

    .venv/bin/python bench/run_all.py            # full sizes
    .venv/bin/python bench/run_all.py --quick    # smaller sizes where a benchmark supports it

Each `bench/bench_*.py` prints its report (markdown) on stdout, logs on stderr, and writes JSON with
`--out`; this script runs them one after the other, keeps the JSON in .bench/, and puts the reports
together with a description of the machine and the command that reproduces each one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK_FLAG = "--quick"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, GPU: {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that have it")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (e.g. initializers)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    out_dir = REPO / ".bench"
    out_dir.mkdir(exist_ok=True)
    scripts = sorted((REPO / "bench").glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{n.strip()}.py" for n in args.only.split(",")}
        scripts = [s for s in scripts if s.name in wanted]
    sections = []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        cmd = [sys.executable, str(script.relative_to(REPO)), "--out", f".bench/{name}.json"]
        if args.quick and QUICK_FLAG in script.read_text():
            cmd.append(QUICK_FLAG)
        shown = " ".join([".venv/bin/python", *cmd[1:]])
        print(f"== {shown}", file=sys.stderr, flush=True)
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        took = time.monotonic() - started
        print(result.stdout, flush=True)
        status = "" if result.returncode == 0 else f"\n**failed with exit code {result.returncode}**\n"
        sections.append(f"## {name}\n\n`{shown}` ({took:.0f} s)\n{status}\n{result.stdout.strip()}\n")
    today = datetime.date.today().isoformat()
    args.doc.parent.mkdir(exist_ok=True)
    args.doc.write_text(
        "# Benchmarks\n\n"
        f"Measured on {today} with `make bench` ({'--quick' if args.quick else 'full sizes'}) on: "
        f"{machine()}.\n\n"
        "Every figure is measured side by side with the tool a user would otherwise pick, in the same run "
        "(one process tree, one after the other); ratios compare the two. Rerun with the command under each "
        "heading; the raw JSON lands in `.bench/`.\n\n" + "\n".join(sections)
    )
    print(f"wrote {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
