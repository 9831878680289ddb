"""TrainJob status reporting: what it costs the training loop, ours vs the Kubeflow SDK's helper.

    .venv/bin/python bench/bench_reporting.py                  # 40 steps per healthy run, 6 per hostile one
    .venv/bin/python bench/bench_reporting.py --quick --out /tmp/reporting.json

The baseline is what a runtime author would write with the Kubeflow SDK 0.5.0: call
`kubeflow.trainer.update_trainjob_status(progress, eta, metrics)` after each step (it throttles to one update
per 5 s, POSTs synchronously with a 5 s timeout). Ours: `pkg.trainer.trainjob_status.StatusReporter.log`
after each step (a background sender, one update per `status_interval` = 5 s, backing off on failures).
A loop of N steps, each `--step-s` of sleep standing for the compute, reports to a real HTTPS status server
(tests/support/status_server.py, a throwaway CA) that answers, hangs, or answers 500. Figures: seconds the
reporting added to the loop (wall - N x step) and how many requests the server received. Ratios are
baseline / ours (higher is better for us).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pkg.trainer import trainjob_status  # noqa: E402
from tests.support.status_server import StatusServer  # noqa: E402
from tests.support.tls import make_certificates  # noqa: E402


def record(step: int) -> dict:
    return {"step": step, "loss": 2.0 / step, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0}


def loop(report, steps: int, step_s: float) -> float:
    """Seconds the reporting added to `steps` steps of `step_s`."""
    started = time.monotonic()
    for step in range(1, steps + 1):
        time.sleep(step_s)
        report(step)
    return time.monotonic() - started - steps * step_s


def ours(env: dict[str, str], steps: int, step_s: float) -> float:
    os.environ.update(env)
    reporter = trainjob_status.from_env(5.0, steps, 0, steps)
    added = loop(lambda s: reporter.log(record(s)), steps, step_s)
    reporter.close()  # the final update is not part of the loop
    return added


def sdk(env: dict[str, str], steps: int, step_s: float) -> float:
    from kubeflow.trainer.backends.kubernetes import utils

    os.environ.update(env)
    utils._last_update_time, utils._cached_token = 0.0, None  # a fresh process
    metrics = {k: v for k, v in record(1).items() if k != "step"}

    def report(step: int) -> None:
        utils.update_trainjob_status(progress_percent=100 * step // steps, estimated_remaining_seconds=10,
                                     metrics=metrics)  # fmt: skip

    return loop(report, steps, step_s)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--step-s", type=float, default=0.05, help="seconds of 'compute' per step")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # both sides warn on failures; the figures are what counts
    healthy, hostile = (20, 3) if args.quick else (40, 6)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ca, cert, key = make_certificates(Path(tmp))
        token = Path(tmp) / "token"
        token.write_text("bench-token")
        for mode, steps in (("ok", healthy), ("500", healthy), ("hang", hostile)):
            row = {"server": mode, "steps": steps}
            for name, run in (("sdk", sdk), ("ours", ours)):
                with StatusServer(token, mode=mode, hang_s=30).serve_tls(cert, key).start() as server:
                    row[f"{name}_added_s"] = round(run(server.env(ca), steps, args.step_s), 3)
                    row[f"{name}_requests"] = server.attempts
            rows.append(row)
            print(f"{mode}: {row}", file=sys.stderr)
    print("#### TrainJob status: seconds added to the training loop (Kubeflow SDK 0.5.0 helper vs ours)")
    print()
    print(f"{args.step_s * 1000:.0f} ms steps, one report call per step; the server answers (ok), "
          "answers 500, or never answers (hang).")  # fmt: skip
    print()
    print("| server | steps | SDK: added s | ours: added s | SDK requests | our requests |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['steps']} | {r['sdk_added_s']:.3f} | {r['ours_added_s']:.3f} | "
              f"{r['sdk_requests']} | {r['ours_requests']} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
