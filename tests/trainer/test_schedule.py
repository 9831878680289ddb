"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import pytest

from pkg.trainer.config import TrainConfig
from pkg.trainer.recipe import lr_lambda


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
