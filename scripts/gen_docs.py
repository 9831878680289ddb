"""Regenerate the reference sections of the docs from the code, so the docs cannot drift.

    .venv/bin/python scripts/gen_docs.py          # rewrite README.md and docs/*.md in place
    .venv/bin/python scripts/gen_docs.py --check  # exit 1 if one is out of date (run by the tests)

Each generated section sits between `<!-- BEGIN NAME -->` and `<!-- END NAME -->` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def trainer_reference() -> str:
    from pkg.trainer.config import TrainConfig

    rows = ["| key | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            default = ",".join(default)
        choices = f.metadata.get("choices")
        text = f.metadata["help"] + (f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else "")
        text = text.replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default}` | {text} |")
    return "\n".join(rows)


def initializer_reference() -> str:
    from pkg.initializers.config import ENV_VARS

    return env_table(ENV_VARS)


def exporter_reference() -> str:
    from pkg.model_exporter.config import ENV_VARS

    return env_table(ENV_VARS)


def env_table(variables: tuple) -> str:
    rows = ["| variable | default | description |", "|---|---|---|"]
    for var in variables:
        rows.append(f"| `{var.name}` | {f'`{var.default}`' if var.default else ''} | {var.help} |")
    return "\n".join(rows)


def tune_reference() -> str:
    """The `tune run` table: every torchtune key, its class (honoured, mapped, refused, cosmetic), the
    TrainConfig key it sets and what it does; then the dataset builders."""
    from pkg.trainer.config import field_types
    from pkg.trainer.torchtune_configs import VERSION
    from pkg.trainer.tune import BUILDERS, DPO_RECIPES, KEYS, RECIPES

    rows = ["| torchtune key | class | llm-trainer key | what it does here |", "|---|---|---|---|"]
    for key in KEYS:
        target = f"`{key.field}`" if key.field else ""
        note = key.note.replace("|", "\\|")
        rows.append(f"| `{key.name}` | {key.kind} | {target} | {note} |")
    rows += ["", "| dataset builder (`dataset._component_` or `dataset=`) | format | arguments |"]
    rows.append("|---|---|---|")
    for name, builder in BUILDERS.items():
        fixed = ", ".join(f"{k} from `{v}`" for k, v in builder.columns.items())
        fmt = builder.fmt + (f" ({fixed})" if fixed else "")
        fmt += "; train_on_input defaults to True" if builder.train_on_input else ""
        rows.append(f"| `{name}` | {fmt} | {', '.join(f'`{a}`' for a in builder.args)} |")
    recipes = ", ".join(f"`{name}` ({method})" for name, method in RECIPES.items())
    dpo = ", ".join(f"`{name}`" for name in DPO_RECIPES)
    if "objective" in field_types():
        dpo += ": preference training (`objective: dpo`) with the same method"
    else:
        dpo += ": refused, preference training is not in this build"
    return "\n".join([*rows, "", f"Recipes: {recipes}. {dpo}. Published configs: torchtune {VERSION}'s."])


SECTIONS = {
    "trainer-config": trainer_reference,
    "initializer-env": initializer_reference,
    "exporter-env": exporter_reference,
    "tune-keys": tune_reference,
}
# Which generated sections each document holds.
DOCS = {
    "README.md": ("initializer-env", "trainer-config"),
    "docs/initializers.md": ("initializer-env",),
    "docs/exporter.md": ("exporter-env",),
    "docs/trainer.md": ("tune-keys", "trainer-config"),
}


def render(path: str, text: str) -> str:
    for name in DOCS[path]:
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{path} lacks the markers of section {name}")
        text = pattern.sub(lambda m, name=name: m.group(1) + SECTIONS[name]() + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is not up to date")
    args = parser.parse_args()
    stale = []
    for path in DOCS:
        current = (REPO / path).read_text()
        fresh = render(path, current)
        if fresh != current:
            stale.append(path)
            if not args.check:
                (REPO / path).write_text(fresh)
    if args.check and stale:
        print(f"{', '.join(stale)} out of date: run .venv/bin/python scripts/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
