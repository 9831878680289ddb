"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import pytest
import torch

from pkg.trainer.config import TrainConfig
from pkg.trainer.recipe import lr_lambda, rebase_schedule

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_then_decay(kind):
    factor = lr_lambda(TrainConfig(lr_scheduler=kind, warmup_steps=4), total_steps=14)
    assert [factor(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factor(4) == 1.0
    later = [factor(s) for s in range(4, 14)]
    assert later == sorted(later, reverse=True)
    if kind == "cosine":
        assert factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    elif kind == "linear":
        assert factor(9) == pytest.approx(0.5)
    else:
        assert set(later) == {1.0}


def test_extended_run_follows_the_new_length():
    """A finished 10-step cosine run extended to 20 steps continues on the 20-step schedule."""
    cfg = TrainConfig(lr_scheduler="cosine", warmup_steps=2, learning_rate=0.1)

    def scheduler(total: int):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.learning_rate)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))

    old = scheduler(10)
    for _ in range(10):
        old.optimizer.step()
        old.step()
    new = scheduler(20)
    new.load_state_dict(old.state_dict())  # what resuming from the step-10 checkpoint does
    before, after = rebase_schedule(new, cfg.learning_rate, 10)
    assert before == pytest.approx(0.0, abs=1e-12)  # the old schedule had decayed to zero
    assert after == pytest.approx(0.1 * lr_lambda(cfg, 20)(10)) and after > 0.05
    assert new.optimizer.param_groups[0]["lr"] == after
    new.optimizer.step()
    new.step()
    assert new.get_last_lr()[0] == pytest.approx(0.1 * lr_lambda(cfg, 20)(11))
    # Resuming on the same schedule changes nothing.
    same = scheduler(10)
    same.load_state_dict(old.state_dict())
    before, after = rebase_schedule(same, cfg.learning_rate, 10)
    assert before == after
