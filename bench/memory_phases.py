"""Where a trainer run's resident memory goes: VmRSS at each phase boundary and each phase's sampled peak.

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory_phases.py --model_dir M --dataset_dir D --output_dir O ...

Runs `python -m pkg.trainer` with the same arguments in this process, with a thread sampling VmRSS every
2 ms. The phases are marked where they can be seen from outside the recipe: the trainer's log lines
(tokenizing, the model built, each step's line, done), every backward (`Tensor.backward`) and every
optimizer step (torch's global optimizer-step hooks). At the end it prints each phase's RSS at its start,
its sampled peak, and the process's VmHWM, so the phase that sets the peak and what sits above the tensors
in it can be read off (bench/bench_full_floor.py's anatomy in docs/benchmarks.md came from this).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


class Phases:
    def __init__(self) -> None:
        self.rows: list[list] = []  # [name, RSS at start, sampled peak]
        self.mark("start")
        threading.Thread(target=self.sample, daemon=True).start()

    def mark(self, name: str) -> None:
        rss = status("VmRSS:")
        self.rows.append([name, rss, rss])

    def sample(self) -> None:
        while True:
            row = self.rows[-1]
            row[2] = max(row[2], status("VmRSS:"))
            time.sleep(0.002)

    def report(self) -> str:
        lines = ["| phase | RSS at start (MiB) | sampled peak (MiB) |", "|---|---|---|"]
        lines += [f"| {name} | {start:.0f} | {peak:.0f} |" for name, start, peak in self.rows]
        return "\n".join(lines) + f"\n\nVmHWM {status('VmHWM:'):.0f} MiB\n"


def main() -> int:
    phases = Phases()
    import torch
    from torch.optim import optimizer

    phases.mark("torch imported")

    class Marker(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            for prefix in ("tokenizing", "full:", "lora:", "qlora:", "world size", "step ", "done"):
                if text.startswith(prefix):
                    phases.mark("log: " + text[:40].replace("|", "/"))

    backward = torch.Tensor.backward
    inside = []  # optimizer_in_backward's per-parameter steps are part of the backward

    def marked_backward(self, *args, **kwargs):
        phases.mark("backward")
        inside.append(True)
        try:
            return backward(self, *args, **kwargs)
        finally:
            inside.pop()
            phases.mark("after backward")

    def step_mark(name: str):
        return lambda *_: None if inside else phases.mark(name)

    torch.Tensor.backward = marked_backward
    optimizer.register_optimizer_step_pre_hook(step_mark("optimizer step"))
    optimizer.register_optimizer_step_post_hook(step_mark("after optimizer step"))
    import pkg.trainer.__main__ as entry

    phases.mark("trainer imported")
    real_setup = entry.setup_logging

    def setup_and_mark(is_main: bool) -> None:
        real_setup(is_main)
        logging.getLogger("pkg.trainer").addHandler(Marker())

    entry.setup_logging = setup_and_mark
    code = entry.main(sys.argv[1:])
    phases.mark("end")
    print(phases.report())
    return code


if __name__ == "__main__":
    sys.exit(main())
