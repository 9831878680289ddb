"""`tune run`: the command line of torchtune, as the Kubeflow SDK and the Trainer controller send it.

    tune run [--rdzv_endpoint=HOST:PORT] RECIPE --config CONFIG key=value ...
    python -m pkg.trainer.tune run ...                                  # the same, without the executable

A `BuiltinTrainer(config=TorchTuneConfig(...))` on a runtime labelled `trainer.kubeflow.org/framework:
torchtune` reaches the container as such a command (with PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK in
the environment). This module translates all of it into one TrainConfig (the table KEYS below says what each
torchtune key becomes), refuses a key it does not know before anything starts, and then launches the workers
of `pkg.trainer` exactly as torchrun would, with the same launcher flags and PET_* variables.

torchtune semantics kept: `batch_size` is per device, so the global batch is batch_size x world size x
gradient_accumulation_steps; the recipe and `model.quantize_base` choose lora / qlora / full; the defaults of
a CONFIG name torchtune ships come from its published file (torchtune_configs.py), other names get ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pkg.trainer.config import TrainConfig, field_types, split_spec
from pkg.trainer.errors import ConfigError
from pkg.trainer.torchtune_configs import CONFIGS

log = logging.getLogger("pkg.trainer.tune")

RECIPES = {
    "lora_finetune_distributed": "lora",
    "lora_finetune_single_device": "lora",
    "full_finetune_distributed": "full",
    "full_finetune_single_device": "full",
}
DPO_RECIPES = {
    "lora_dpo_distributed": "lora",
    "lora_dpo_single_device": "lora",
    "full_dpo_distributed": "full",
}
# torchtune's attention names -> the module names of Llama-family models in transformers (Llama, Qwen2/2.5/3,
# Mistral, Gemma ...). MODULE_NAMES overrides them for architectures that name their layers otherwise.
ATTENTION = {"q_proj": ["q_proj"], "k_proj": ["k_proj"], "v_proj": ["v_proj"], "output_proj": ["o_proj"]}
MLP = ["gate_proj", "up_proj", "down_proj"]
OUTPUT = ["lm_head"]
QKV = ("q_proj", "k_proj", "v_proj")
MODULE_NAMES: dict[str, dict[str, list[str]]] = {
    "phi3": {**{name: ["qkv_proj"] for name in QKV}, "mlp": ["gate_up_proj", "down_proj"]},
    "phi": {"output_proj": ["dense"], "mlp": ["fc1", "fc2"]},
    "opt": {"output_proj": ["out_proj"], "mlp": ["fc1", "fc2"]},
    "gpt_neox": {
        **{name: ["query_key_value"] for name in QKV},
        "output_proj": ["dense"],
        "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
    },
}
LOSSES = (
    "torchtune.modules.loss.CEWithChunkedOutputLoss",
    "torchtune.modules.loss.LinearCrossEntropyLoss",
    "torch.nn.CrossEntropyLoss",
)
DATASETS = {  # torchtune dataset builder -> dataset_format (instruct_dataset: see dataset_format())
    "torchtune.datasets.instruct_dataset": "input_output",
    "torchtune.datasets.alpaca_dataset": "alpaca",
    "torchtune.datasets.alpaca_cleaned_dataset": "alpaca",
    "torchtune.datasets.chat_dataset": "messages",
    "torchtune.datasets.text_completion_dataset": "text",
}
NULL = {"null", "none", "~", ""}


# ---------------------------------------------------------------- value parsers: (key, raw text) -> value


def text(key: str, raw: str) -> str:
    return raw


def _optional(parse: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    def parse_optional(key: str, raw: str) -> Any:
        return None if raw.strip().lower() in NULL else parse(key, raw)

    return parse_optional


def integer(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw}: expected an integer") from None


def number(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw}: expected a number") from None


def boolean(key: str, raw: str) -> bool:
    if raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise ConfigError(f"{key}={raw}: expected True or False")


def one_of(*values: str) -> Callable[[str, str], str]:
    def parse_choice(key: str, raw: str) -> str:
        if raw not in values:
            raise ConfigError(f"{key}={raw}: expected one of {', '.join(values)}")
        return raw

    return parse_choice


def names(key: str, raw: str) -> list[str]:
    """`[q_proj,v_proj]` as the SDK writes it (or a YAML list, or one bare name)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={raw}: expected a list of names like [q_proj,v_proj]")
    return value


def mapping(key: str, raw: str) -> dict[str, str]:
    """`{'input': 'question', 'output': 'answer'}` (a Python dict repr, as the SDK writes it, is YAML)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{key}={raw}: expected a mapping like {{'input': 'question', 'output': 'answer'}}")
    unknown = sorted(set(value) - {"input", "output"})
    if unknown:
        raise ConfigError(f"{key}: instruct_dataset columns are input and output, not {', '.join(unknown)}")
    return value


def split(key: str, raw: str) -> str:
    try:
        split_spec(raw)
    except ConfigError as exc:
        raise ConfigError(f"{key}={raw}: {str(exc).split(': ', 1)[1]}") from None
    return raw


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Key:
    """One torchtune key: what it becomes here (`field`, a TrainConfig key or a description) and how."""

    name: str
    field: str | None  # the TrainConfig key it sets directly; None: see `note`
    parse: Callable[[str, str], Any]
    note: str
    warn: bool = False  # accepted, but it has no meaning here: one warning line


KEYS: list[Key] = [
    # Paths (the controller adds these from the runtime's command)
    Key("output_dir", "output_dir", text, "Where adapter/, model/, checkpoints/ and metrics go."),
    Key("checkpointer.checkpoint_dir", "model_dir", text, "The model: any Hugging Face causal LM."),
    Key("tokenizer.path", None, text, "Not needed: the tokenizer is read from the model folder."),
    Key("tokenizer.merges_file", None, text, "Not needed: the tokenizer is read from the model folder."),
    Key("tokenizer.max_seq_len", "max_seq_length", _optional(integer), "Tokens per sequence (null: ours)."),
    # Dataset
    Key("dataset", "dataset_format", one_of(*DATASETS), "instruct_dataset: input/output columns as a user "
        "and an assistant turn (alpaca columns when there is an instruction column and no column_map); "
        "alpaca_dataset: alpaca; chat_dataset: messages; text_completion_dataset: text."),
    Key("dataset.data_dir", "dataset_dir", text, "The dataset folder (or one of its folders)."),
    Key("dataset.data_files", "dataset_dir", text, "One data file instead of a folder."),
    Key("dataset.source", "dataset_source", one_of("json", "csv", "parquet", "arrow", "text", "xml"),
        "Type of the data files."),
    Key("dataset.split", "dataset_split", split, "Split and slice: train, train[:10%], train[100:500]."),
    Key("dataset.column_map", "column_map", mapping, "The dataset's names for the input and output columns."),
    Key("dataset.new_system_prompt", "system_prompt", text, "A system message before every sample."),
    Key("dataset.train_on_input", "train_on_prompt", boolean, "Also train on the prompt tokens."),
    Key("dataset.packed", "packing", boolean, "Pack samples into full sequences."),
    # Model and method
    Key("model.lora_rank", "lora_rank", integer, "LoRA rank."),
    Key("model.lora_alpha", "lora_alpha", integer, "LoRA alpha."),
    Key("model.lora_dropout", "lora_dropout", number, "Dropout on the LoRA input."),
    Key("model.lora_attn_modules", "lora_target_modules", names, "Attention layers with adapters: q_proj, "
        "k_proj, v_proj, output_proj, named as the model names them (Llama family: q_proj, k_proj, v_proj, "
        "o_proj)."),
    Key("model.apply_lora_to_mlp", "lora_target_modules", boolean, "Adds the MLP layers (gate_proj, up_proj, "
        "down_proj in the Llama family)."),
    Key("model.apply_lora_to_output", "lora_target_modules", boolean, "Adds the output head (lm_head)."),
    Key("model.quantize_base", "method", boolean, "True on a LoRA recipe: qlora (a 4-bit base)."),
    Key("model.use_dora", "use_dora", boolean, "DoRA adapters (peft's use_dora)."),
    # Training
    Key("dtype", "precision", one_of("bf16", "fp32"), "Compute precision (not given: bf16 where supported)."),
    Key("batch_size", "micro_batch_size", integer, "Samples per device per forward pass; global_batch_size = "
        "batch_size x world size x gradient_accumulation_steps."),
    Key("gradient_accumulation_steps", "global_batch_size", integer, "See batch_size."),
    Key("epochs", "num_epochs", integer, "Passes over the data."),
    Key("max_steps_per_epoch", "max_steps_per_epoch", _optional(integer), "Cap on the steps of an epoch."),
    Key("optimizer.lr", "learning_rate", number, "Peak learning rate (AdamW)."),
    Key("optimizer.weight_decay", "weight_decay", number, "AdamW weight decay."),
    Key("lr_scheduler.num_warmup_steps", "warmup_steps", integer, "Linear warmup steps, then cosine decay."),
    Key("clip_grad_norm", "max_grad_norm", _optional(number), "Gradient norm clipping (null: off)."),
    Key("enable_activation_checkpointing", "activation_checkpointing", boolean, "Recompute activations."),
    Key("seed", "seed", _optional(integer), "Seed of data order and initialization (null: ours)."),
    Key("resume_from_checkpoint", "resume", boolean, "True: continue from the newest checkpoint (auto); "
        "False: start over (never)."),
    Key("log_every_n_steps", "log_every", integer, "Steps between progress lines."),
    Key("loss", None, one_of(*LOSSES), "Accepted: the loss is the token-mean cross-entropy, computed only "
        "where a target is (which is what the chunked loss saves memory for)."),
    # Keys of torchtune's configs with no meaning here: one warning line each
    *(
        Key(name, None, text, "No meaning here; ignored with a warning.", warn=True)
        for name in (
            "compile", "device", "shuffle", "log_level", "log_peak_memory_stats", "save_adapter_weights_only",
            "enable_activation_offloading", "activation_offloading_use_streams", "optimizer_in_bwd",
            "fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers",
            "run_val_every_n_steps",
            "batch_size_val", "tensor_parallel_dim", "tensor_parallel_plan", "data_parallel_shard_dim",
            "data_parallel_replicate_dim", "context_parallel_dim", "cpu_offload", "low_cpu_ram",
            "optimizer", "optimizer._component_", "optimizer.fused", "optimizer.betas", "optimizer.eps",
            "lr_scheduler", "lr_scheduler._component_", "model",
            "tokenizer", "checkpointer", "loss.num_output_chunks",
        )
    ),
]  # fmt: skip
# Key groups whose every sub-key has no meaning here (profiler.enabled, metric_logger.log_dir ...).
IGNORED_GROUPS = (
    "profiler",
    "metric_logger",
    "checkpointer",
    "dataset_val",
    "tokenizer",
    "model",
    "quantizer",
)
BY_NAME = {k.name: k for k in KEYS}


def known(key: str) -> Key | None:
    """The table's entry for a key, a warning entry for a sub-key of an ignored group, or None (unknown)."""
    if key in BY_NAME:
        return BY_NAME[key]
    group = key.split(".", 1)[0]
    if "." in key and group in IGNORED_GROUPS:
        # model.* and tokenizer.* keys this table does not list have no effect here (model._component_ ...)
        # but a near miss of a listed one is a typo, refused below.
        close = difflib.get_close_matches(
            key, [k for k in BY_NAME if k.startswith(group + ".")], n=1, cutoff=0.85
        )
        if not close:
            return Key(key, None, text, "", warn=True)
    return None


def unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, [k.name for k in KEYS if not k.warn], n=1, cutoff=0.5)
    close = close or difflib.get_close_matches(key, list(BY_NAME), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return ConfigError(
        f"unknown torchtune key {key!r}: {hint}(docs/trainer.md lists the keys tune run reads)"
    )


# ---------------------------------------------------------------- the command line


@dataclass
class Command:
    launcher: list[str]  # torchrun flags given before the recipe
    recipe: str
    config: str
    overrides: dict[str, str]  # key -> raw value, in order (a later one wins)


def _launcher_flags(argv: list[str]) -> tuple[list[str], int]:
    """The torchrun flags at the start of argv (checked against torchrun's own parser) and where they end."""
    from torch.distributed.run import get_args_parser

    options = get_args_parser()._option_string_actions
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag = argv[i].split("=", 1)[0]
        action = options.get(flag)
        if action is None or flag in ("-h", "--help", "-m", "--module", "--no-python", "--no_python"):
            valid = [o for o in options if o.startswith("--") and o not in ("--help", "--module")]
            close = difflib.get_close_matches(flag, valid, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown launcher flag {flag!r} before the recipe{hint}")
        i += 1 if action.nargs == 0 or "=" in argv[i] else 2
    if i > len(argv):
        raise ConfigError(f"launcher flag {argv[-1]} needs a value")
    return argv[:i], i


def parse_command(argv: list[str]) -> Command:
    """`run [launcher flags] RECIPE --config CONFIG key=value ...` into its parts (no value parsed yet)."""
    if not argv or argv[0] != "run":
        raise ConfigError(
            "usage: tune run [--rdzv_endpoint=HOST:PORT] RECIPE --config CONFIG [key=value ...]"
        )
    launcher, i = _launcher_flags(argv[1:])
    rest = argv[1 + i :]
    if not rest:
        raise ConfigError("tune run: the recipe is missing (e.g. lora_finetune_distributed)")
    recipe, rest = rest[0], rest[1:]
    config, overrides = None, {}
    j = 0
    while j < len(rest):
        arg = rest[j]
        if arg in ("--config", "-c"):
            if j + 1 >= len(rest):
                raise ConfigError("--config needs a config name (e.g. llama3_2/1B_lora)")
            config, j = rest[j + 1], j + 2
            continue
        if arg.startswith("--config="):
            config, j = arg.split("=", 1)[1], j + 1
            continue
        key, eq, value = arg.partition("=")
        if not eq or not key or key.startswith(("-", "~")):
            raise ConfigError(f"unexpected argument {arg!r}: torchtune overrides are key=value")
        overrides[key] = value
        j += 1
    if config is None:
        raise ConfigError(f"tune run {recipe}: --config CONFIG is missing (e.g. llama3_2/1B_lora)")
    return Command(launcher, recipe, config, overrides)


# ---------------------------------------------------------------- translation


def published_defaults(config: str) -> dict[str, Any]:
    """The torchtune settings of a config torchtune ships (as parsed values), or {} for another name."""
    pub = CONFIGS.get(config.removesuffix(".yaml"))
    if pub is None:
        return {}
    out: dict[str, Any] = {
        "optimizer.lr": pub.learning_rate,
        "optimizer.weight_decay": pub.weight_decay,
        "lr_scheduler.num_warmup_steps": pub.warmup_steps or 0,
        "gradient_accumulation_steps": pub.gradient_accumulation_steps,
        "batch_size": pub.batch_size,
        "epochs": pub.epochs,
        "max_steps_per_epoch": pub.max_steps_per_epoch,
        "enable_activation_checkpointing": pub.activation_checkpointing,
        "dataset.split": pub.split,
    }
    if pub.lora:
        out.update(zip(("model.lora_rank", "model.lora_alpha", "model.lora_dropout"), pub.lora, strict=True))
        out.update({
            "model.lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
            "model.apply_lora_to_mlp": pub.lora_mlp,
            "model.apply_lora_to_output": pub.lora_output,
            "model.quantize_base": pub.quantize_base,
            "model.use_dora": pub.use_dora,
        })  # fmt: skip
    return out


def module_names(model_dir: str | None) -> dict[str, list[str]]:
    """torchtune's layer names -> this model's module names, from its config.json's model_type."""
    names = {**ATTENTION, "mlp": MLP, "output": OUTPUT}
    try:
        model_type = json.loads((Path(model_dir or "") / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    return {**names, **MODULE_NAMES.get(model_type or "", {})}


def lora_targets(tt: dict[str, Any], model_dir: str | None) -> list[str]:
    """lora_target_modules from model.lora_attn_modules, apply_lora_to_mlp and apply_lora_to_output."""
    attn = tt.get("model.lora_attn_modules")
    mlp, output = tt.get("model.apply_lora_to_mlp", False), tt.get("model.apply_lora_to_output", False)
    if attn is None and not mlp and not output:
        return ["all-linear"]  # not a torchtune name: ours
    bad = [name for name in attn or [] if name not in ATTENTION]
    if bad:
        raise ConfigError(f"model.lora_attn_modules: {', '.join(bad)} is not one of {', '.join(ATTENTION)}")
    names = module_names(model_dir)
    targets: list[str] = []
    for group in [*(attn or []), *(["mlp"] if mlp else []), *(["output"] if output else [])]:
        targets += [n for n in names[group] if n not in targets]
    if not targets:
        raise ConfigError("no LoRA target: give model.lora_attn_modules or set model.apply_lora_to_mlp=True")
    return targets


def dataset_format(tt: dict[str, Any]) -> str:
    builder = tt.get("dataset")
    if builder is None:
        return "auto"
    if builder == "torchtune.datasets.instruct_dataset" and "dataset.column_map" not in tt:
        # Without a column_map, alpaca-style data (instruction/input/output) keeps its instruction: auto
        # reads it as alpaca, and data with only input/output columns as input_output.
        return "auto"
    return DATASETS[builder]


def num_nodes(nnodes: str) -> int:
    """torchrun's --nnodes (`2`, or `2:2`; an elastic range such as `1:4` is refused)."""
    low, _, high = str(nnodes).partition(":")
    try:
        n = int(low)
        if high and int(high) != n:
            raise ConfigError(f"--nnodes {nnodes}: elastic ranges are not supported; give one number")
    except ValueError:
        raise ConfigError(f"--nnodes {nnodes}: expected a number") from None
    return n


def recipe_method(recipe: str) -> str:
    """lora or full, from the recipe name; unknown recipes (and DPO without preference training) refused."""
    if recipe in DPO_RECIPES and "objective" not in field_types():
        raise ConfigError(
            f"recipe {recipe}: preference training (DPO) is not in this build of the llm-trainer; "
            "use lora_finetune_distributed or full_finetune_distributed"
        )
    methods = {**RECIPES, **DPO_RECIPES}
    if recipe not in methods:
        close = difflib.get_close_matches(recipe, list(methods), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown recipe {recipe!r}{hint} (recipes: {', '.join(methods)})")
    return methods[recipe]


def parse_overrides(cmd: Command, method: str) -> tuple[dict[str, Any], list[str]]:
    """The parsed value of each key=value (unknown keys refused), and a warning per meaningless key."""
    given, warnings = {}, []
    for key, raw in cmd.overrides.items():
        spec = known(key)
        if spec is None:
            raise unknown(key)
        if spec.warn:
            warnings.append(f"{key}={raw} has no meaning for the llm-trainer; ignored")
            continue
        given[key] = spec.parse(key, raw)
    lora_keys = [k for k, v in given.items() if k.startswith("model.") and v is not False]
    if method == "full" and lora_keys:
        raise ConfigError(
            f"{lora_keys[0]}: the recipe {cmd.recipe} trains all weights; use a lora_* recipe for LoRA"
        )
    if "dataset.data_dir" in given and "dataset.data_files" in given:
        raise ConfigError("give dataset.data_dir or dataset.data_files, not both")
    for key in ("batch_size", "gradient_accumulation_steps"):
        if key in given and given[key] < 1:
            raise ConfigError(f"{key}={given[key]}: must be >= 1")
    return given, warnings


def translate(cmd: Command, world: int) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig of a `tune run` command at this world size, and the warning lines to print."""
    method = recipe_method(cmd.recipe)
    given, warnings = parse_overrides(cmd, method)
    tt = {**published_defaults(cmd.config), **given}  # torchtune's settings: its config, then the overrides
    if method == "full":
        tt = {k: v for k, v in tt.items() if not k.startswith("model.")}
    values: dict[str, Any] = {  # the keys that map one to one (null: keep ours)
        BY_NAME[k].field: v for k, v in tt.items() if BY_NAME[k].field and v is not None and k not in DERIVED
    }
    if "clip_grad_norm" in tt and tt["clip_grad_norm"] is None:
        values["max_grad_norm"] = 0.0  # torchtune: null means no clipping
    if "resume_from_checkpoint" in tt:
        values["resume"] = "auto" if tt["resume_from_checkpoint"] else "never"
    if "dataset" in tt:
        values["dataset_format"] = dataset_format(tt)
    published = CONFIGS.get(cmd.config.removesuffix(".yaml"))
    if published and published.warmup_steps is None and "lr_scheduler.num_warmup_steps" not in given:
        values["lr_scheduler"] = "constant"  # the config has no scheduler
    defaults = TrainConfig()
    micro = tt.get("batch_size", defaults.micro_batch_size)
    accum = tt.get("gradient_accumulation_steps")
    if accum is None:  # ours: our global batch where it divides, else one micro-batch per rank
        accum = max(1, defaults.global_batch_size // (micro * world))
    values["micro_batch_size"], values["global_batch_size"] = micro, micro * world * accum
    values["method"] = "full" if method == "full" else "qlora" if tt.get("model.quantize_base") else "lora"
    if method != "full":
        values["lora_target_modules"] = lora_targets(tt, tt.get("checkpointer.checkpoint_dir"))
    if cmd.recipe in DPO_RECIPES:
        values["objective"] = "dpo"
    try:
        return TrainConfig(**values).validate(), warnings
    except ConfigError as exc:
        # Name the torchtune key the user wrote when the refused setting came from one.
        source = next((k for k in given if BY_NAME[k].field and str(exc).startswith(BY_NAME[k].field)), None)
        where = f"{source}={cmd.overrides[source]}" if source else f"{cmd.recipe} --config {cmd.config}"
        raise ConfigError(f"{where}: {exc}") from None


# Keys whose TrainConfig value is computed in translate() rather than copied.
DERIVED = {
    "gradient_accumulation_steps", "batch_size", "model.lora_attn_modules", "model.apply_lora_to_mlp",
    "model.apply_lora_to_output", "model.quantize_base", "dataset", "resume_from_checkpoint", "loss",
}  # fmt: skip


def trainer_args(cfg: TrainConfig) -> list[str]:
    """The `--key=value` flags of pkg.trainer for every setting that differs from its default."""
    defaults = TrainConfig()
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        out.append(f"--{f.name}={value}")
    return out


# ---------------------------------------------------------------- launch


def local_processes(value: str) -> int:
    """torchrun's --nproc-per-node; `auto` (and `gpu`) is the GPUs present, else 1 (not the CPU count)."""
    if value in ("auto", "gpu"):
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"nproc per node {value!r}: expected a number or auto") from None
    if n < 1:
        raise ConfigError(f"nproc per node must be >= 1, got {n}")
    return n


def launch_args(cmd: Command):
    """torchrun's parsed arguments for this command (PET_* variables apply as torchrun applies them)."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args([*cmd.launcher, "-m", "pkg.trainer"])
    args.nproc_per_node = str(local_processes(str(args.nproc_per_node)))
    flags = {arg.split("=", 1)[0].replace("_", "-") for arg in cmd.launcher}
    endpoint = args.rdzv_endpoint or flags & {"--master-addr", "--master-port"}
    endpoint = endpoint or {"PET_MASTER_ADDR", "PET_MASTER_PORT"} & set(os.environ)
    if not endpoint and not args.standalone:
        if num_nodes(args.nnodes) != 1:
            raise ConfigError(
                f"{args.nnodes} nodes need --rdzv_endpoint=HOST:PORT (the Trainer controller adds it)"
            )
        args.standalone = True  # one node: a free local port, nothing to agree on
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stdout)  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"], ["run", "--help"], ["run", "-h"]):
        print(__doc__)
        return 0
    try:
        cmd = parse_command(argv)
        args = launch_args(cmd)
        world = num_nodes(args.nnodes) * int(args.nproc_per_node)
        cfg, warnings = translate(cmd, world)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    args.training_script_args = trainer_args(cfg)
    log.info("tune run %s --config %s -> %s", cmd.recipe, cmd.config, " ".join(args.training_script_args))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    try:
        run(args)
    except ChildFailedError as exc:  # the workers said why (rank 0's one line); pass their exit code on
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c > 0), 1)
    except SignalException as exc:  # SIGTERM (eviction): the workers checkpointed and stopped
        print(f"tune run: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
