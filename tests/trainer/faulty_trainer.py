"""`torchrun -m tests.trainer.faulty_trainer ...`: the trainer with faults injected, for the resume tests.

The production loop carries no test hook: this wrapper patches `Recipe.train_step` before running the
trainer's own entry point. Variables (unset: the trainer runs unchanged):
- ``TRAINER_TEST_KILL_AT_STEP=N``: SIGKILL one rank once N steps are done (saved, stop signal checked),
  only in the first attempt of a torchrun group (``TORCHELASTIC_RESTART_COUNT`` 0) and only on the rank
  ``TRAINER_TEST_KILL_RANK`` (default 1), so a restarted group runs through;
- ``TRAINER_TEST_STEP_SLEEP=S``: every step lasts S seconds longer, so a test can signal a run mid-way.
"""

from __future__ import annotations

import os
import signal
import time

from pkg.trainer import __main__ as entry
from pkg.trainer.distributed import exit_process
from pkg.trainer.recipe import Recipe


def fault(steps_done: int) -> None:
    if sleep := os.environ.get("TRAINER_TEST_STEP_SLEEP"):
        time.sleep(float(sleep))
    at = os.environ.get("TRAINER_TEST_KILL_AT_STEP")
    if not at or int(at) != steps_done or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("TRAINER_TEST_KILL_RANK", "1")):
        os.kill(os.getpid(), signal.SIGKILL)


def patch() -> None:
    train_step = Recipe.train_step

    def faulty_train_step(self: Recipe, step: int) -> dict[str, float]:
        fault(step)  # `step` steps are done: where the production loop goes on to the next one
        return train_step(self, step)

    Recipe.train_step = faulty_train_step  # type: ignore[method-assign]


if __name__ == "__main__":
    patch()
    exit_process(entry.main())
