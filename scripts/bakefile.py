"""docker-bake.hcl resolved the way `docker buildx bake --print` resolves it, for the buildah build path.

python-hcl2 parses the file into a syntax tree; this module evaluates on that tree what bake adds to
plain HCL: variables (their default, or the environment variable of the same name), `${}` interpolation,
the functions bake offers that a bake file commonly calls, conditionals and comparisons, blocks of the
same name merged, and target `inherits` (maps such as args, labels and contexts merged key by key,
everything else replaced by the child). Anything else is refused with one line naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hcl2
import lark
from hcl2.rules.abstract import LarkToken
from hcl2.rules.base import AttributeRule, BlockRule, BodyRule
from hcl2.rules.containers import ObjectElemKeyExpressionRule, ObjectRule, TupleRule
from hcl2.rules.expressions import BinaryOpRule, ConditionalRule, ExprTermRule, UnaryOpRule
from hcl2.rules.functions import FunctionCallRule
from hcl2.rules.literal_rules import FloatLitRule, IdentifierRule, IntLitRule, LiteralValueRule
from hcl2.rules.strings import InterpolationRule, StringRule
from hcl2.utils import process_escape_sequences


class BakeError(Exception):
    """docker-bake.hcl cannot be read or evaluated; the message says where and why."""


def _format(spec: str, *values: Any) -> str:
    """HCL's format() for the verbs a bake file uses: %s, %d, %v and %%."""
    out, rest, i = [], list(values), 0
    while i < len(spec):
        if spec[i] == "%" and i + 1 < len(spec):
            verb = spec[i + 1]
            if verb == "%":
                out.append("%")
            elif verb in "sdv" and rest:
                out.append(_to_string(rest.pop(0)))
            else:
                raise BakeError(f"format(): unsupported verb %{verb} in {spec!r}")
            i += 2
        else:
            out.append(spec[i])
            i += 1
    return "".join(out)


# The functions of bake's HCL standard library that bake files call to build tags, platforms and args.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "split": lambda sep, text: text.split(sep),
    "join": lambda sep, items: sep.join(_to_string(item) for item in items),
    "lower": str.lower,
    "upper": str.upper,
    "trimspace": str.strip,
    "trimprefix": lambda text, prefix: text.removeprefix(prefix),
    "trimsuffix": lambda text, suffix: text.removesuffix(suffix),
    "replace": lambda text, old, new: text.replace(old, new),
    "format": _format,
    "concat": lambda *lists: [item for items in lists for item in items],
    "coalesce": lambda *values: next((v for v in values if v not in ("", None)), None),
    "length": len,
    "contains": lambda items, value: value in items,
    "equal": lambda a, b: a == b,
    "notequal": lambda a, b: a != b,
    "and": lambda *values: all(values),
    "or": lambda *values: any(values),
    "not": lambda value: not value,
}

_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "&&": lambda a, b: a and b,
    "||": lambda a, b: a or b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
}


def _to_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise BakeError(f"cannot use {value!r} inside a string")


def _typed(name: str, text: str) -> Any:
    try:
        return json.loads(text.lower() if text else "null")
    except json.JSONDecodeError:
        raise BakeError(f"{name}={text!r} from the environment is not a number or true/false") from None


def _line(node: Any) -> str:
    meta = getattr(node, "_meta", None)
    return f"line {meta.line}: " if meta is not None and getattr(meta, "line", None) else ""


class _Evaluator:
    """Evaluates expressions of the syntax tree; variables are resolved on first use (they may refer to
    each other, as in bake)."""

    def __init__(self, variables: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.definitions = variables
        self.env = env
        self.values: dict[str, Any] = {}
        self.resolving: list[str] = []

    def variable(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        if name not in self.definitions:
            raise BakeError(f"undefined variable {name}")
        if name in self.resolving:
            raise BakeError(f"variable {name} refers to itself through {' -> '.join(self.resolving)}")
        self.resolving.append(name)
        default = self.definitions[name]
        value = "" if default is None else self.eval(default)
        self.resolving.pop()
        if name in self.env:  # as in bake, the environment overrides the default, typed like it
            value = self.env[name] if isinstance(value, str) else _typed(name, self.env[name])
        self.values[name] = value
        return value

    def eval(self, node: Any) -> Any:
        if isinstance(node, ExprTermRule):
            return self.eval(node.expression)
        if isinstance(node, StringRule):
            return "".join(self.string_part(part.content) for part in node.string_parts)
        if isinstance(node, IdentifierRule):
            if str(node.token.value) not in self.definitions:
                raise BakeError(f"{_line(node)}undefined variable {node.token.value}")
            return self.variable(str(node.token.value))
        if isinstance(node, IntLitRule | FloatLitRule):
            return node.serialize()
        if isinstance(node, LiteralValueRule):
            return {"true": True, "false": False, "null": None}[str(node.token.value)]
        if isinstance(node, TupleRule):
            return [self.eval(element) for element in node.elements]
        if isinstance(node, ObjectRule):
            return {self.key(element.key.value): self.eval(element.expression) for element in node.elements}
        if isinstance(node, FunctionCallRule):
            return self.call(node)
        if isinstance(node, ConditionalRule):
            return self.eval(node.if_true if self.eval(node.condition) else node.if_false)
        if isinstance(node, BinaryOpRule):
            operator = str(node.binary_term.binary_operator.token.value).strip()
            if operator not in _OPERATORS:
                raise BakeError(f"{_line(node)}operator {operator} is not supported here")
            return _OPERATORS[operator](self.eval(node.expr_term), self.eval(node.binary_term.expr_term))
        if isinstance(node, UnaryOpRule) and node.operator == "!":
            return not self.eval(node.expr_term)
        raise BakeError(f"{_line(node)}unsupported expression {hcl2.reconstruct(node.to_lark()).strip()!r}")

    def string_part(self, content: Any) -> str:
        if isinstance(content, InterpolationRule):
            return _to_string(self.eval(content.expression))
        if isinstance(content, LarkToken) and content.lark_name() in (
            "ESCAPED_INTERPOLATION",
            "ESCAPED_DIRECTIVE",
        ):
            return str(content.value)[1:]  # $${ is a literal ${, %%{ a literal %{
        if isinstance(content, LarkToken) and content.lark_name() == "STRING_CHARS":
            return process_escape_sequences(str(content.value))
        raise BakeError(f"{_line(content)}template directives (%{{...}}) are not supported")

    def key(self, key: Any) -> str:
        # An object key is a bare name, a string, or a parenthesised expression.
        if isinstance(key, IdentifierRule):
            return str(key.token.value)
        if isinstance(key, ObjectElemKeyExpressionRule):
            return _to_string(self.eval(key.expression))
        return _to_string(self.eval(key))

    def call(self, node: FunctionCallRule) -> Any:
        name = "::".join(str(identifier.token.value) for identifier in node.identifiers)
        if name not in FUNCTIONS:
            raise BakeError(
                f"{_line(node)}function {name}() is not supported by scripts/build_local_images.py "
                f"(it knows {', '.join(sorted(FUNCTIONS))}); add it to FUNCTIONS in scripts/bakefile.py"
            )
        args = [self.eval(argument) for argument in (node.arguments.arguments if node.arguments else [])]
        try:
            return FUNCTIONS[name](*args)
        except (TypeError, AttributeError) as error:
            raise BakeError(f"{_line(node)}{name}(): {error}") from None


def _label(block: BlockRule) -> tuple[str, str | None]:
    kind, *labels = block.labels
    name = None
    if labels:
        label = labels[0]
        name = str(label.token.value) if isinstance(label, IdentifierRule) else _Evaluator({}, {}).eval(label)
    return str(kind.token.value), name


def _attributes(body: BodyRule) -> dict[str, Any]:
    return {
        str(c.identifier.token.value): c.expression for c in body.children if isinstance(c, AttributeRule)
    }


def _merge(into: dict[str, Any], attrs: Mapping[str, Any]) -> None:
    """bake's merge of a parent (or an earlier block) into a target: maps key by key, the rest replaced."""
    for key, value in attrs.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into[key] = value


def load(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """{"group": {name: {"targets": [...]}}, "target": {name: {...}}} as `docker buildx bake --print`
    resolves them (targets whose name starts with "_" are only inherited, and left out)."""
    try:
        tree = hcl2.parses(path.read_text(), discard_comments=True)
    except OSError as error:
        raise BakeError(f"cannot read {path}: {error.strerror}") from None
    except lark.exceptions.UnexpectedInput as error:
        raise BakeError(f"{path.name}: line {error.line}, column {error.column}: not valid HCL") from None
    variables: dict[str, Any] = {}
    raw: dict[str, dict[str, dict[str, Any]]] = {"group": {}, "target": {}}
    for block in (c for c in tree.body.children if isinstance(c, BlockRule)):
        kind, name = _label(block)
        attrs = _attributes(block.body)
        if kind == "variable" and name:
            variables[name] = attrs.get("default")
        elif kind in raw and name:
            raw[kind].setdefault(name, {}).update(attrs)  # same-named blocks add up, as in bake
        elif kind != "function":  # user functions are skipped here; a call to one is refused below
            raise BakeError(f"{path.name}: {_line(block)}unsupported block {kind!r}")
    evaluator = _Evaluator(variables, env)

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        if name not in raw["target"]:
            raise BakeError(f"unknown target {name!r}")
        if name in seen:
            raise BakeError(f"inheritance cycle {' -> '.join((*seen, name))}")
        attrs = raw["target"][name]
        merged: dict[str, Any] = {}
        for parent in evaluator.eval(attrs["inherits"]) if "inherits" in attrs else []:
            _merge(merged, resolve(parent, (*seen, name)))
        _merge(merged, {k: evaluator.eval(v) for k, v in attrs.items() if k != "inherits"})
        return merged

    try:
        groups = {
            name: {"targets": evaluator.eval(attrs["targets"]) if "targets" in attrs else []}
            for name, attrs in raw["group"].items()
        }
        targets = {name: resolve(name) for name in raw["target"] if not name.startswith("_")}
    except BakeError as error:
        raise BakeError(f"{path.name}: {error}") from None
    return {"group": groups, "target": targets}
