"""Several trainer runs in turn in one torchrun launch: one per architecture and method, same processes.

    torchrun --nproc-per-node 2 tests/trainer/arch_worker.py RESULTS.json RUNS.json

RUNS.json is a list of {"name": ..., "args": {trainer key: value}}. Each run goes through the trainer's own
entry point (`pkg.trainer.__main__.main`), exactly as `torchrun -m pkg.trainer` would, except that the process
group stays up between runs (a launch costs 10-20 s here, a tiny run a few). Rank 0 writes RESULTS.json:
{name: {"code": exit code, "error": the error line or None, "seconds": wall time}}.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pkg.trainer import distributed
from pkg.trainer.__main__ import main
from tests.trainer.conftest import cli


def run_all(results_path: Path, runs: list[dict]) -> None:
    distributed.shutdown = lambda: None  # keep the group for the next run; torchrun's exit ends it
    results = {}
    for run in runs:
        started, stderr = time.monotonic(), io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                code = main(cli(run["args"]))
            except Exception as exc:  # a bug: record it and go on (dist_timeout_minutes bounds a stuck peer)
                code = 99
                print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
        results[run["name"]] = {
            "code": code,
            "error": errors[0] if errors else None,
            "seconds": round(time.monotonic() - started, 2),
        }
        print(f"arch_worker: {run['name']}: exit {code} in {results[run['name']]['seconds']}s", flush=True)
    if distributed.env_rank() == 0:
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_all(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
    distributed.exit_process(0)
