"""Regenerate the reference sections of README.md from the code, so the docs cannot drift.

    .venv/bin/python scripts/gen_docs.py          # rewrite README.md in place
    .venv/bin/python scripts/gen_docs.py --check  # exit 1 if README.md is out of date (run by the tests)

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

    rows = ["| variable | default | description |", "|---|---|---|"]
    for var in ENV_VARS:
        rows.append(f"| `{var.name}` | {f'`{var.default}`' if var.default else ''} | {var.help} |")
    return "\n".join(rows)


SECTIONS = {"trainer-config": trainer_reference, "initializer-env": initializer_reference}


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the markers of section {name}")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is not up to date")
    args = parser.parse_args()
    readme = REPO / "README.md"
    current = readme.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md is out of date: run .venv/bin/python scripts/gen_docs.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
