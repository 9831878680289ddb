"""Peak memory and time of listing a large Hub repo: our listing vs huggingface_hub's `list_repo_tree`.

    .venv/bin/python bench/bench_listing.py --out .bench/listing.json      # 1M tree entries
    .venv/bin/python bench/bench_listing.py --quick                         # 100k

A local server (tests/support/hostile_server.py) serves one repo's tree in pages of 1000 entries, each as the
Hub writes them (LFS info, xet hash, last commit). Each side lists it in a fresh process; the figure is that
process's peak RSS (ru_maxrss) and wall time. Ours: `HfSource.list_files()` (what the initializers run);
the baseline: `list(HfApi(endpoint).list_repo_tree(..., recursive=True))`, what a user of huggingface_hub
(and the upstream initializer) holds. The server runs in this process, so both sides pay for it alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.hostile_server import HostileServer, Seen, hub_answers, json_answer  # noqa: E402

PAGE = 1000
OURS = """
import os, resource
from pkg.initializers.config import load_config
from pkg.initializers.sources.hf import HfSource
config = load_config("model", {"STORAGE_URI": "hf://org/name", "HF_ENDPOINT": os.environ["ENDPOINT"]})
n = len(HfSource(config.uri, config).list_files())
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
BASELINE = """
import os, resource
from huggingface_hub import HfApi
api = HfApi(endpoint=os.environ["ENDPOINT"], token=False)
n = len(list(api.list_repo_tree("org/name", recursive=True, revision="main")))
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def entry(i: int) -> dict[str, Any]:
    return {
        "type": "file",
        "oid": f"{i:040x}",
        "size": i,
        "path": f"shard-{i // 10000:04d}/part-{i:08d}.parquet",
        "lfs": {"oid": f"{i:064x}", "size": i, "pointerSize": 134},
        "xetHash": f"{i + 1:064x}",
        "lastCommit": {"id": f"{i:040x}", "title": "Upload dataset", "date": "2026-01-01T00:00:00.000Z"},
    }


def serve(entries: int) -> HostileServer:
    def tree(seen: Seen) -> Any:
        cursor = int(seen.query.get("cursor", "0"))
        page = [entry(i) for i in range(cursor, min(cursor + PAGE, entries))]
        headers = {}
        if cursor + PAGE < entries:
            base = seen.path.split("?")[0]
            headers["Link"] = f'<{server.endpoint}{base}?recursive=true&cursor={cursor + PAGE}>; rel="next"'
        return json_answer(page, headers)

    server = HostileServer(hub_answers({}, tree=tree)).start()
    return server


def measure(code: str, endpoint: str) -> dict[str, float]:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    count, rss_kib = out.stdout.split()
    return {"entries": int(count), "peak_rss_mib": int(rss_kib) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100k entries")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.entries = 100_000
    server = serve(args.entries)
    try:
        ours = measure(OURS, server.endpoint)
        baseline = measure(BASELINE, server.endpoint)
    finally:
        server.stop()
    result = {
        "entries": args.entries,
        "ours": ours,
        "huggingface_hub": baseline,
        "rss_ratio": baseline["peak_rss_mib"] / ours["peak_rss_mib"],
        "time_ratio": baseline["seconds"] / ours["seconds"],
    }
    print("| tool | entries | peak RSS MB | seconds |\n|---|---:|---:|---:|")
    for name in ("ours", "huggingface_hub"):
        row = result[name]
        print(f"| {name} | {row['entries']:,} | {row['peak_rss_mib']:.0f} | {row['seconds']:.1f} |")
    print(
        f"\n- huggingface_hub / ours: {result['rss_ratio']:.1f}x the peak RSS, "
        f"{result['time_ratio']:.1f}x the time\n\nEach side lists the same paged tree in a fresh process; "
        "peak RSS includes the interpreter and its imports. Times include the local server's share of the "
        "cores, so they are noisy on a shared machine."
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
