"""values.py: the value parsers the config and `tune run` share (the fast tier)."""

from __future__ import annotations

import pytest

from pkg.trainer import values
from pkg.trainer.config import coerce
from pkg.trainer.errors import ConfigError
from pkg.trainer.tune import boolean, mapping, names

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("parse", "raw", "want"),
    [
        (values.boolean, "Yes", True),
        (values.boolean, " off ", False),
        (values.boolean, True, True),
        (values.integer, "12", 12),
        (values.integer, 7, 7),
        (values.number, "1e-4", 1e-4),
        (values.number, 3, 3.0),
        (values.names, "q_proj, v_proj", ["q_proj", "v_proj"]),
        (values.names, "[q_proj,v_proj]", ["q_proj", "v_proj"]),
        (values.names, ["a"], ["a"]),
        (values.names, "", []),
        (values.mapping, "{'input': 'question'}", {"input": "question"}),
        (values.mapping, "", {}),
    ],
)
def test_parsers_accept(parse, raw, want):
    assert parse(raw) == want


@pytest.mark.parametrize(
    ("parse", "raw"),
    [
        (values.boolean, "maybe"),
        (values.integer, "1.5"),
        (values.integer, True),
        (values.number, "fast"),
        (values.names, "[a, [b]]"),
        (values.mapping, "{a: }"),
        (values.mapping, "[a, b]"),
    ],
)
def test_parsers_refuse(parse, raw):
    with pytest.raises(values.BadValue):
        parse(raw)


def test_each_caller_names_the_key_its_own_way():
    with pytest.raises(ConfigError, match=r"^max_steps: expected an integer, got 'ten'$"):
        coerce("max_steps", "ten")
    with pytest.raises(ConfigError, match=r"^dataset\.packed=yes: expected true or false$"):
        boolean("dataset.packed", "yes")  # OmegaConf's booleans are true and false only
    assert boolean("dataset.packed", "True") is True
    from_tune = names("model.lora_attn_modules", "[q_proj,v_proj]")
    assert from_tune == coerce("lora_target_modules", "q_proj,v_proj")
    assert mapping("dataset.column_map", "{'input': 'q'}") == coerce("column_map", "{input: q}")
