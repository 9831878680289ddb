"""Regenerate pkg/trainer/torchtune_configs.json from the YAML files of the pinned torchtune wheel.

    .venv/bin/python scripts/gen_torchtune_configs.py          # from the installed torchtune (--no-deps)
    .venv/bin/python scripts/gen_torchtune_configs.py torchtune-0.6.1-py3-none-any.whl
    .venv/bin/python scripts/gen_torchtune_configs.py --check  # exit 1 if the table is out of date

Nothing of torchtune is imported: its recipe registry (`torchtune/_recipe_registry.py`, plain dataclasses) is
executed on its own and the YAML files are read as text. The table keeps, for every text config of the recipes
`tune run` answers, each key of the file flattened to dotted names (`optimizer.lr`), minus the paths of the
machine torchtune's authors ran it on (`/tmp/Llama-3.2-1B-Instruct/...`): a `tune run` here reads the model,
data and output from the folders the Kubeflow initializers fill (or the keys the user gives).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import types
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "pkg" / "trainer" / "torchtune_configs.json"
VERSION = "0.6.1"  # the torchtune the upstream torchtune-trainer image runs (requirements/torchtune.txt)
RECIPES = (
    "full_finetune_single_device", "full_finetune_distributed", "lora_finetune_single_device",
    "lora_finetune_distributed", "lora_dpo_single_device", "lora_dpo_distributed", "full_dpo_distributed",
)  # fmt: skip
# Keys that hold a path on torchtune's authors' machine (or the model's file names there).
PATHS = {
    "output_dir", "checkpointer.checkpoint_dir", "checkpointer.checkpoint_files", "checkpointer.output_dir",
    "ref_checkpointer.checkpoint_dir", "ref_checkpointer.checkpoint_files", "ref_checkpointer.output_dir",
    "tokenizer.path", "tokenizer.merges_file", "tokenizer.vocab_path", "tokenizer.merges_path",
    "profiler.output_dir", "metric_logger.log_dir",
}  # fmt: skip


# Keys whose value is a mapping, not a group of keys.
VALUE_MAPPINGS = ("column_map", "checkpoint_files")


class Wheel:
    """The files of a torchtune wheel, or of the installed distribution, by their path in the wheel."""

    def __init__(self, source: str | None) -> None:
        if source:
            self.zip = zipfile.ZipFile(source)
            self.version = Path(source).name.split("-")[1]
        else:
            self.dist = importlib.metadata.distribution("torchtune")
            self.zip, self.version = None, self.dist.version

    def read(self, path: str) -> str:
        if self.zip is not None:
            return self.zip.read(path).decode()
        return Path(self.dist.locate_file(path)).read_text()


def registry(wheel: Wheel) -> dict[str, list[tuple[str, str]]]:
    """recipe -> [(config name, file path under recipes/configs/)], from torchtune's own registry."""
    module = types.ModuleType("torchtune_recipe_registry")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(
            compile(wheel.read("torchtune/_recipe_registry.py"), "_recipe_registry.py", "exec"),
            module.__dict__,
        )
    finally:
        del sys.modules[module.__name__]
    return {r.name: [(c.name, c.file_path) for c in r.configs] for r in module.get_all_recipes()}


def flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key not in VALUE_MAPPINGS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_text(flat: dict) -> bool:
    """Vision (multimodal) configs are not text fine-tuning."""
    return "collate_fn" not in flat and "vision" not in str(flat.get("model._component_", ""))


def generate(wheel: Wheel) -> dict:
    recipes, configs = {}, {}
    for recipe, entries in registry(wheel).items():
        if recipe not in RECIPES:
            continue
        names = []
        for name, path in entries:
            flat = flatten(yaml.safe_load(wheel.read(f"recipes/configs/{path}")))
            if not is_text(flat):
                continue
            names.append(name)
            configs[name] = {k: v for k, v in flat.items() if k not in PATHS}
        recipes[recipe] = sorted(names)
    return {"torchtune": wheel.version, "recipes": recipes, "configs": dict(sorted(configs.items()))}


def render(table: dict) -> str:
    """JSON with one config per line (diffs stay readable)."""
    lines = [
        "{",
        f'"torchtune": {json.dumps(table["torchtune"])},',
        '"generated_by": "scripts/gen_torchtune_configs.py (from the torchtune wheel\'s recipes/configs)",',
        f'"recipes": {json.dumps(table["recipes"])},',
        '"configs": {',
    ]
    items = list(table["configs"].items())
    for i, (name, flat) in enumerate(items):
        lines.append(f"{json.dumps(name)}: {json.dumps(flat)}{',' if i < len(items) - 1 else ''}")
    return "\n".join([*lines, "}", "}"]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", nargs="?", help="a torchtune .whl (default: the installed distribution)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table differs")
    args = parser.parse_args()
    wheel = Wheel(args.wheel)
    if wheel.version != VERSION:
        print(f"torchtune {wheel.version} found; the table is of torchtune {VERSION}", file=sys.stderr)
        return 1
    text = render(generate(wheel))
    if args.check:
        if TABLE.read_text() != text:
            print(f"{TABLE.relative_to(REPO)} is out of date: run scripts/gen_torchtune_configs.py")
            return 1
        return 0
    TABLE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
