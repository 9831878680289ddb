"""Parsing one setting's value: shared by the config (YAML and `--key value`) and `tune run` (`key=value`).

Each parser takes what the user wrote (text, or a value YAML already typed) and returns the value, or raises
:class:`BadValue` saying what was expected ("an integer"); the caller names the key in its own way
(`max_steps: expected an integer, got 'ten'`, `batch_size=two: expected an integer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TRUE = frozenset({"true", "yes", "1", "on"})
FALSE = frozenset({"false", "no", "0", "off"})


class BadValue(ValueError):
    """The value is not of the expected kind; the message is what was expected."""


def boolean(value: Any, true: frozenset[str] = TRUE, false: frozenset[str] = FALSE) -> bool:
    """A YAML boolean, or one of the `true` / `false` spellings (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in true | false:
        return value.strip().lower() in true
    raise BadValue("true or false")


def auto_boolean(value: Any) -> str:
    """`auto` (the trainer decides), or a boolean as `true` / `false`."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return "true" if boolean(value) else "false"
    except BadValue:
        raise BadValue("auto, true or false") from None


def integer(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():  # YAML's 2.0 (OmegaConf, torchtune configs)
        return int(value)
    return _scalar(value, int, "an integer")


def number(value: Any) -> float:
    return float(_scalar(value, float, "a number"))


def _scalar(value: Any, kind: type[int] | type[float], expected: str) -> int | float:
    """`value` as `kind` from YAML's number (an int where an int is wanted) or from text."""
    if isinstance(value, kind if kind is int else int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise BadValue(expected)


def names(value: Any) -> list[str]:
    """A list of names: a YAML list, `[q_proj,v_proj]` (as the SDK writes it) or `q_proj,v_proj`."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = None
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadValue("a list of names like [q_proj, v_proj] or q_proj,v_proj")
    return value


def mapping(value: Any) -> dict[str, str]:
    """A {name: name} mapping from YAML, or text holding one (`{a: b}`, a Python dict repr, JSON)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
    ):
        raise BadValue("a mapping of names like {input: question}")
    return dict(value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (YAML would keep the last one silently; OmegaConf, which
    reads torchtune's configs, refuses it too)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise BadValue(f"is invalid: key {key!r} is given twice (line {line}): keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds ({} for an empty file); BadValue says what is wrong with the file."""
    try:
        loader = _UniqueKeyLoader(Path(path).read_text())
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise BadValue("does not exist") from None
    except IsADirectoryError:
        raise BadValue("is a folder: give the YAML file itself") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadValue(f"cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise BadValue(f"is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadValue("must be a mapping of key: value")
    return data
