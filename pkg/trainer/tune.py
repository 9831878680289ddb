"""`tune run`, `tune ls`, `tune cp`, `tune validate`: torchtune's command line, answered by the llm-trainer.

    tune run [--rdzv_endpoint=HOST:PORT] RECIPE --config CONFIG key=value ~key ...
    tune ls                       # the recipes and their published configs
    tune cp CONFIG FILE           # a published config as a file to edit (our rendering of its settings)
    tune validate FILE            # check a config file without running anything (no GPU needed)
    python -m pkg.trainer.tune run ...                                  # the same, without the executable

A `BuiltinTrainer(config=TorchTuneConfig(...))` on a runtime labelled `trainer.kubeflow.org/framework:
torchtune` reaches the container as such a command (with PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK in
the environment). CONFIG is a config torchtune publishes (`llama3_2/1B_lora`, its settings in
torchtune_configs.json) or a YAML file in torchtune's format (`_component_` entries, `${output_dir}`
interpolation, nested groups). Every key of either, then every key=value (which wins; `~key` removes one),
goes through the table KEYS below, which says what each key becomes: honoured (same effect), mapped (our
equivalent), refused (one line naming it and why, exit 2, nothing written) or cosmetic (one warning).
Then the workers of `pkg.trainer` start exactly as torchrun would, with the same launcher flags and PET_*
variables.

torchtune semantics kept: `batch_size` is per device, so the global batch is batch_size x world size x
gradient_accumulation_steps; the recipe, `model._component_` (a qlora_ builder) and `model.quantize_base`
choose lora / qlora / full; a null `clip_grad_norm` does not clip; a null `tokenizer.max_seq_len` does not
truncate (a row longer than the model's context stops the run, naming it); SFT conversations are checked by
torchtune's validate_messages rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from pkg.trainer import launch, values
from pkg.trainer.config import DATASET_KEYS, TrainConfig, field_types, split_spec
from pkg.trainer.errors import ConfigError
from pkg.trainer.torchtune_configs import CONFIGS, RECIPE_CONFIGS, VERSION

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
CE_LOSSES = (
    "torchtune.modules.loss.CEWithChunkedOutputLoss",
    "torchtune.modules.loss.LinearCrossEntropyLoss",
    "torch.nn.CrossEntropyLoss",
)
DPO_LOSS = "torchtune.rlhf.loss.DPOLoss"
NULL = {"null", "none", "~"}  # and a bare `key=` (None); a quoted "" or a YAML "" is an empty string
DELETE = object()  # `~key` on the command line: remove the key (and its group) from the config
PROMPT_TEMPLATES = {"torchtune.data.GrammarErrorCorrectionTemplate": "grammar",
                    "torchtune.data.SummarizeTemplate": "summarize",
                    "torchtune.models.llama2.Llama2ChatTemplate": "llama2_chat",
                    "torchtune.models.mistral.MistralChatTemplate": "mistral_chat"}  # fmt: skip
# tokenizer._component_ -> message_format: each family's tokenize_messages, rendered exactly (chat_format.py).
MESSAGE_FORMATS = {"torchtune.models.llama3.llama3_tokenizer": "llama3",
                   "torchtune.models.qwen2.qwen2_tokenizer": "chatml",
                   "torchtune.models.qwen2_5.qwen2_5_tokenizer": "chatml",
                   "torchtune.models.llama2.llama2_tokenizer": "llama2",
                   "torchtune.models.mistral.mistral_tokenizer": "llama2",
                   "torchtune.models.gemma.gemma_tokenizer": "llama2",
                   "torchtune.models.phi3.phi3_mini_tokenizer": "phi3",
                   "torchtune.models.phi4.phi4_tokenizer": "phi4"}  # fmt: skip
# The prompt template a tokenizer builder applies when tokenizer.prompt_template is not given (null: none).
DEFAULT_TEMPLATES = {
    "torchtune.models.llama2.llama2_tokenizer": "torchtune.models.llama2.Llama2ChatTemplate",
    "torchtune.models.mistral.mistral_tokenizer": "torchtune.models.mistral.MistralChatTemplate",
}
# The special tokens each format writes (Gemma's BOS and EOS have names of their own): torchtune writes them
# whatever the model folder holds, so a folder whose tokenizer lacks one is refused.
MESSAGE_TOKENS = {"llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                             "<|end_of_text|>"),
                  "chatml": ("<|im_start|>", "<|im_end|>"),
                  "llama2": ("<s>", "</s>"),
                  "phi3": ("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                  "phi4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>")}  # fmt: skip
GEMMA_TOKENS = ("<bos>", "<eos>")


# ---------------------------------------------------------------- value parsers: (key, value) -> value
# A value is text from the command line or a YAML value from a config file; both go through the same parser.


def text(key: str, raw: Any) -> str:
    if isinstance(raw, bool | dict | list) or raw is None:
        raise ConfigError(f"{key}={raw}: expected a string")
    return str(raw)


def _optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def parse_optional(key: str, raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in NULL):
            return None
        return parse(key, raw)

    return parse_optional


def _shared(parse: Callable[[Any], Any]) -> Callable[[str, Any], Any]:
    """A parser of values.py (the config's own) as a (key, raw) parser with tune's error line."""

    def parse_value(key: str, raw: Any) -> Any:
        try:
            return parse(raw)
        except values.BadValue as why:
            raise ConfigError(f"{key}={raw}: expected {why}") from None

    return parse_value


integer = _shared(values.integer)
number = _shared(values.number)
# OmegaConf, which reads torchtune's key=value, takes only true and false (any case) as booleans.
boolean = _shared(partial(values.boolean, true=frozenset({"true"}), false=frozenset({"false"})))
names = _shared(values.names)
mapping = _shared(values.mapping)


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def parse_choice(key: str, raw: Any) -> str:
        if raw not in choices:
            raise ConfigError(f"{key}={raw}: expected one of {', '.join(choices)}")
        return raw

    return parse_choice


def _yaml(raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return None


def anything(key: str, raw: Any) -> Any:
    return raw


def split(key: str, raw: Any) -> str:
    raw = text(key, raw)
    try:
        split_spec(raw)
    except ConfigError as exc:
        raise ConfigError(f"{key}={raw}: {str(exc).split(': ', 1)[1]}") from None
    return raw


def checkpoint_files(key: str, raw: Any) -> list[str]:
    """A list of file names, or torchtune's form {filename_format: model-{}-of-{}.safetensors,
    max_filename: 00004}."""
    value = _yaml(raw)
    if isinstance(value, dict) and set(value) == {"filename_format", "max_filename"}:
        fmt, last = str(value["filename_format"]), str(value["max_filename"])
        if fmt.count("{}") != 2 or not last.isdigit():
            raise ConfigError(f"{key}: filename_format needs two {{}} and max_filename digits, got {value}")
        return [fmt.format(str(i).zfill(len(last)), last) for i in range(1, int(last) + 1)]
    return names(key, value)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Key:
    """One torchtune key and what it becomes here.

    kind: honoured (same effect as in torchtune), mapped (our equivalent, described in `note`), refused (never
    accepted: `note` says why and what to use) or cosmetic (no effect on results or memory: one warning when
    the user gives it). `accept` lists the values of a key that is honoured only for them (the others are
    refused with `note`); `field` is the TrainConfig key it sets, for the docs.
    """

    name: str
    kind: str
    parse: Callable[[str, Any], Any]
    note: str
    field: str = ""
    accept: tuple | None = None


def _k(name, kind, parse, note, field="", accept=None) -> Key:
    return Key(name, kind, parse, note, field, accept)


FSDP = "the llm-trainer's FSDP2 setup"
COLLATE = ("sft", "dpo", "packed")
KEYS: list[Key] = [
    # Paths (the controller adds these from the runtime's command)
    _k("output_dir", "honoured", text, "Where adapter/, model/, checkpoints/ and metrics go, and torchtune's "
       "epoch_{N}/ (links to the same files).", "output_dir"),
    _k("checkpointer.checkpoint_dir", "honoured", text, "The model: any Hugging Face causal LM folder.",
       "model_dir"),
    _k("checkpointer.checkpoint_files", "honoured", checkpoint_files, "The model's weight files (a list, or "
       "filename_format + max_filename); each must exist in checkpoint_dir, and they must be all its weight "
       "files (the trainer reads the folder)."),
    _k("checkpointer.output_dir", "honoured", text, "Must be output_dir (torchtune's configs say "
       "${output_dir}): checkpoints and outputs go to output_dir."),
    _k("checkpointer._component_", "mapped", text, "Any torchtune checkpointer: the folder is read as a "
       "Hugging Face model (safetensors or .bin, config.json, tokenizer)."),
    _k("checkpointer.model_type", "mapped", text, "The architecture is the folder's config.json model_type."),
    _k("checkpointer.recipe_checkpoint", "honoured", _optional(text), "Only null: resume state lives in "
       "output_dir/checkpoints (resume_from_checkpoint=True).", accept=(None,)),
    _k("checkpointer.adapter_checkpoint", "honoured", _optional(text), "Only null: resume state lives in "
       "output_dir/checkpoints (resume_from_checkpoint=True).", accept=(None,)),
    _k("checkpointer.safe_serialization", "honoured", boolean, "Only True: outputs are safetensors.",
       accept=(True,)),
    _k("ref_checkpointer.checkpoint_dir", "honoured", text, "full_dpo_distributed: the DPO reference model "
       "(default: the starting model).", "reference_model_dir"),
    _k("ref_checkpointer.checkpoint_files", "honoured", checkpoint_files, "As checkpointer.checkpoint_files, "
       "for the reference model."),
    *(_k(f"ref_checkpointer.{k}", "mapped", text, f"As checkpointer.{k}.")
      for k in ("_component_", "model_type", "output_dir")),
    _k("ref_checkpointer.recipe_checkpoint", "honoured", _optional(text), "Only null.", accept=(None,)),
    _k("tokenizer.max_seq_len", "honoured", _optional(integer), "Tokens per sequence; null: no truncation, "
       "and a row longer than the model's max_position_embeddings stops the run naming it.",
       "max_seq_length"),
    _k("tokenizer._component_", "mapped", text, "The tokenizer is the model folder's (tokenizer.json); "
       "the llama3, qwen2, qwen2_5, llama2, mistral, gemma, phi3_mini and phi4 tokenizers set "
       "message_format: SFT and DPO rows rendered as that torchtune tokenizer's tokenize_messages does "
       "(special tokens, masks, BOS/EOS), text rows as its encode does. A model tokenizer without one of "
       "the family's special tokens, or another component, is refused; without the key "
       "(~tokenizer._component_), rows are rendered plain (the model's chat template).",
       "message_format"),
    *(_k(f"tokenizer.{k}", "mapped", text, "The tokenizer is the model folder's (tokenizer.json and its "
         "chat template).") for k in ("path", "merges_file", "vocab_path", "merges_path",
                                      "special_tokens_path")),
    _k("tokenizer.prompt_template", "honoured", _optional(text), "Not given: the tokenizer's default "
       "(llama2_tokenizer: Llama2ChatTemplate, mistral_tokenizer: MistralChatTemplate, others none); null: "
       "none; torchtune.data.GrammarErrorCorrectionTemplate, torchtune.data.SummarizeTemplate, "
       "torchtune.models.llama2.Llama2ChatTemplate or torchtune.models.mistral.MistralChatTemplate: their "
       "words around every user (and system) message.", "prompt_template", accept=(None, *PROMPT_TEMPLATES)),
    # Dataset: dataset._component_ (or dataset=BUILDER) picks a builder of BUILDERS; its arguments below.
    _k("dataset", "honoured", anything, "A list of builders (torchtune's ConcatDataset): each dataset read "
       "with its own builder, columns and files, concatenated in order (the first: the dataset_* keys; the "
       "others: more_datasets).", "more_datasets"),
    _k("dataset._component_", "mapped", text, "The dataset builder (see the builders table): its format, "
       "columns and defaults, read from the dataset folder.", "dataset_format"),
    _k("dataset.source", "mapped", text, "json, csv, parquet, arrow or text: the type of the data files. A "
       "Hub dataset id (tatsu-lab/alpaca): the dataset folder, which the dataset initializer fills.",
       "dataset_source"),
    _k("dataset.data_dir", "honoured", text, "The dataset folder (or one of its folders).", "dataset_dir"),
    _k("dataset.data_files", "honoured", text, "One data file instead of a folder.", "dataset_dir"),
    _k("dataset.split", "honoured", split, "Split and slice: train, train[:10%], train[100:500].",
       "dataset_split"),
    _k("dataset.column_map", "honoured", mapping, "The dataset's names for the builder's columns.",
       "column_map"),
    _k("dataset.new_system_prompt", "honoured", _optional(text), "A system message before every sample "
       "(\"\": an empty one), never trained (also with train_on_input).", "system_prompt"),
    _k("dataset.train_on_input", "honoured", boolean, "Also train on the prompt tokens (alpaca builders: "
       "True unless given).", "train_on_prompt"),
    _k("dataset.packed", "honoured", boolean, "Pack samples into sequences of tokenizer.max_seq_len "
       "(which must be set, as torchtune's PackedDataset needs).",
       "packing"),
    _k("dataset.conversation_column", "honoured", text, "chat_dataset: the column of the conversations.",
       "column_map"),
    _k("dataset.conversation_style", "honoured", one_of("sharegpt", "openai"), "chat_dataset: sharegpt "
       "({from, value}) or openai ({role, content}) messages."),
    _k("dataset.column", "honoured", text, "text_completion_dataset: the text column.", "column_map"),
    _k("dataset.add_eos", "honoured", boolean, "text_completion_dataset: an EOS after each text (default "
       "True).", "add_eos"),
    _k("dataset.split_across_pack", "honoured", boolean, "text_completion_dataset: only False with "
       "packed=True (samples are never cut across packs); any value without packing."),
    _k("dataset.max_seq_len", "honoured", _optional(integer), "cnn_dailymail_articles_dataset, "
       "wikitext_dataset: only null or tokenizer.max_seq_len (every dataset is truncated there)."),
    _k("dataset.subset", "mapped", text, "wikitext_dataset: the Hub dataset's configuration "
       "(default wikitext-103-v1): the dataset folder's subfolder of that name if it has one, else the "
       "dataset folder itself.", "dataset_dir"),
    _k("dataset.filter_fn", "refused", anything, "A Python callable cannot be given to the llm-trainer: "
       "filter the data before the dataset initializer."),
    # Model and method
    _k("model._component_", "mapped", text, "The architecture is the model folder's; a qlora_ builder means "
       "QLoRA (a 4-bit base), a lora_ builder LoRA.", "method"),
    _k("model.lora_rank", "honoured", integer, "LoRA rank.", "lora_rank"),
    _k("model.lora_alpha", "honoured", integer, "LoRA alpha.", "lora_alpha"),
    _k("model.lora_dropout", "honoured", number, "Dropout on the LoRA input.", "lora_dropout"),
    _k("model.lora_attn_modules", "mapped", names, "Attention layers with adapters: q_proj, k_proj, v_proj, "
       "output_proj, named as the model names them (Llama family: q_proj, k_proj, v_proj, o_proj).",
       "lora_target_modules"),
    _k("model.apply_lora_to_mlp", "mapped", boolean, "Adds the MLP layers (gate_proj, up_proj, down_proj in "
       "the Llama family).", "lora_target_modules"),
    _k("model.apply_lora_to_output", "mapped", boolean, "Adds the output head (lm_head).",
       "lora_target_modules"),
    _k("model.quantize_base", "honoured", boolean, "True on a LoRA recipe: qlora (a 4-bit base).", "method"),
    _k("model.use_dora", "honoured", boolean, "DoRA adapters (peft's use_dora).", "use_dora"),
    # Training
    _k("dtype", "honoured", one_of("bf16", "fp32"), "Compute precision.", "precision"),
    _k("batch_size", "honoured", integer, "Samples per device per forward pass; global_batch_size = "
       "batch_size x world size x gradient_accumulation_steps.", "micro_batch_size"),
    _k("gradient_accumulation_steps", "honoured", integer, "See batch_size.", "global_batch_size"),
    _k("epochs", "honoured", integer, "Passes over the data.", "num_epochs"),
    _k("max_steps_per_epoch", "honoured", _optional(integer), "Cap on the steps of an epoch (null: none).",
       "max_steps_per_epoch"),
    _k("optimizer._component_", "mapped", text, "torch.optim.AdamW (fused); torch.optim.Adam (without weight "
       "decay, the same update); torch.optim.SGD (momentum 0); bitsandbytes.optim.AdamW8bit and "
       "PagedAdamW8bit (one CUDA GPU, unsharded: refused in one line elsewhere); others refused.",
       "optimizer"),
    _k("optimizer.lr", "honoured", number, "Peak learning rate.", "learning_rate"),
    _k("optimizer.weight_decay", "honoured", number, "Weight decay on every trained parameter, biases and "
       "norms included (not given: the optimizer's default, AdamW 0.01).", "weight_decay"),
    _k("optimizer.betas", "honoured", names, "Only [0.9, 0.999].", accept=((0.9, 0.999),)),
    _k("optimizer.eps", "honoured", number, "Only 1e-8.", accept=(1e-8,)),
    _k("optimizer.amsgrad", "honoured", boolean, "Only False.", accept=(False,)),
    *(_k(f"optimizer.{k}", "cosmetic", boolean, "The implementation (same math): the trainer picks it.")
      for k in ("fused", "foreach")),
    _k("lr_scheduler._component_", "honoured", one_of(
        "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"),
       "Linear warmup from 0 then cosine decay to 0; no lr_scheduler: a constant learning rate.",
       "lr_scheduler"),
    _k("lr_scheduler.num_warmup_steps", "honoured", integer, "Linear warmup steps.", "warmup_steps"),
    _k("lr_scheduler.num_cycles", "honoured", number, "Only 0.5 (one half cosine).", accept=(0.5,)),
    _k("clip_grad_norm", "honoured", _optional(number), "Gradient norm clipping (null or absent: none).",
       "max_grad_norm"),
    _k("enable_activation_checkpointing", "honoured", boolean, "Recompute activations.",
       "activation_checkpointing"),
    _k("enable_activation_offloading", "honoured", boolean, "Only False: the llm-trainer does not offload "
       "activations to the CPU; use enable_activation_checkpointing=True (recompute) to save memory.",
       accept=(False,)),
    _k("compile", "honoured", boolean, "Only False: the model runs eager (torch.compile is not used).",
       accept=(False,)),
    _k("seed", "honoured", _optional(integer), "Seed of data order and initialization (null: the trainer's "
       "fixed 42 where torchtune draws one at random).", "seed"),
    _k("shuffle", "honoured", boolean, "Shuffle the data each epoch (False: file order).", "shuffle"),
    _k("resume_from_checkpoint", "mapped", boolean, "True: continue from the newest checkpoint in "
       "output_dir (auto); False: start over (never).", "resume"),
    _k("save_adapter_weights_only", "honoured", boolean, "LoRA: False (torchtune's default) also writes the "
       "merged model, as torchtune does; True writes only the adapter.", "merge_adapter"),
    _k("log_every_n_steps", "honoured", integer, "Steps between progress lines.", "log_every"),
    _k("loss._component_", "honoured", one_of(*CE_LOSSES, DPO_LOSS), "SFT: cross-entropy over the target "
       "tokens (chunked, as CEWithChunkedOutputLoss); DPO recipes: DPOLoss."),
    _k("loss.beta", "honoured", number, "DPOLoss beta.", "dpo_beta"),
    _k("loss.label_smoothing", "honoured", number, "DPOLoss label smoothing.", "dpo_label_smoothing"),
    _k("loss.num_output_chunks", "cosmetic", integer, "The head runs in chunks of loss_chunk_size tokens.",
       "loss_chunk_size"),
    _k("metric_logger._component_", "mapped", text, "DiskLogger: progress lines, metrics.jsonl and "
       "torchtune's log_dir/log_<unix time>.txt: `Step N | loss:... lr:... grad_norm:... tokens_per_s:... ` "
       "per logged step (DPO's metrics after loss), `Step N | val_loss:... ` per validation; StdoutLogger: "
       "progress lines and metrics.jsonl; TensorBoardLogger, WandBLogger, MLFlowLogger: that tracker in "
       "report_to (metrics.jsonl too).", "report_to"),
    _k("metric_logger.log_dir", "mapped", _optional(text), "DiskLogger: the log_<unix time>.txt file's "
       "folder (not given: output_dir/logs, the published configs' value); TensorBoardLogger: the event "
       "files' folder; the others: metrics.jsonl stays in output_dir (W&B's files go to output_dir/wandb).",
       "tensorboard_dir"),
    _k("metric_logger.organize_logs", "cosmetic", boolean, "TensorBoardLogger: the event files go straight "
       "into log_dir."),
    _k("metric_logger.project", "honoured", _optional(text), "WandBLogger: the W&B project.",
       "experiment_name"),
    _k("metric_logger.name", "honoured", _optional(text), "WandBLogger: the W&B run name.", "run_name"),
    _k("metric_logger.experiment_name", "honoured", _optional(text), "MLFlowLogger: the MLflow experiment.",
       "experiment_name"),
    _k("metric_logger.run_name", "honoured", _optional(text), "MLFlowLogger: the MLflow run name.",
       "run_name"),
    _k("metric_logger.tracking_uri", "refused", text, "MLFlowLogger: set MLFLOW_TRACKING_URI in the "
       "TrainJob's spec.trainer.env instead."),
    _k("metric_logger.run_id", "refused", text, "MLFlowLogger: a resumed job continues its MLflow run by "
       "itself (the run id is kept in the checkpoint)."),
    _k("metric_logger.entity", "refused", text, "WandBLogger: set WANDB_ENTITY in the TrainJob's "
       "spec.trainer.env instead."),
    _k("metric_logger.group", "refused", text, "WandBLogger: set WANDB_RUN_GROUP in the TrainJob's "
       "spec.trainer.env instead."),
    _k("collate_fn", "honoured", one_of(*(f"torchtune.data.padded_collate_{k}" for k in COLLATE)),
       "Padding to the longest sample of the micro-batch."),
    _k("profiler.enabled", "honoured", boolean, "Only False: profiling is not available.", accept=(False,)),
    _k("profiler.*", "honoured", anything, "The profiler's settings: no effect while it is off."),
    # Memory and scale
    _k("fsdp_cpu_offload", "honoured", boolean, "True: FSDP2's CPU offload of the sharded parameters, "
       "gradients and optimizer state; the optimizer step runs on the CPU.", "cpu_offload"),
    _k("fsdp.cpu_offload", "honoured", boolean, "An older spelling torchtune 0.6.1 does not read: only "
       "False.", accept=(False,)),
    _k("fsdp_reshard_after_forward", "honoured", boolean, f"Only True ({FSDP} reshards after the forward).",
       accept=(True,)),
    _k("custom_sharded_layers", "mapped", names, f"{FSDP} makes the input embedding and the output head "
       "their own units (or splits them by vocabulary, vocab_parallel) always."),
    _k("tensor_parallel_dim", "honoured", integer, "Only 1: no tensor parallelism (FSDP shards instead).",
       accept=(1,)),
    _k("tensor_parallel_plan._component_", "mapped", text, "No tensor parallelism: unused."),
    _k("context_parallel_dim", "honoured", integer, "Only 1: no context parallelism.", accept=(1,)),
    _k("data_parallel_shard_dim", "honoured", integer, "Ranks that share one copy of the weights: -1 all "
       "(world / data_parallel_replicate_dim); N < world: hybrid sharding (HSDP) in groups of N, replicated "
       "across groups; shard x replicate must equal the world size.", "shard_group_size"),
    _k("data_parallel_replicate_dim", "honoured", integer, "Copies of the weights: 1 (full sharding) or R "
       "(hybrid sharding, R groups).", "sharding"),
    _k("optimizer_in_bwd", "honoured", boolean, "True: each weight stepped as the backward reaches it, its "
       "gradient freed (full recipes; needs clip_grad_norm null and gradient_accumulation_steps 1, as in "
       "torchtune): optimizer_in_backward true. False: optimizer_in_backward auto, which steps in the "
       "backward only where the weights come out bit for bit as when stepping after it: False's results, "
       "with less memory.", "optimizer_in_backward"),
    _k("ac_mode", "honoured", _optional(text), "Only null: activation checkpointing is per layer.",
       accept=(None,)),
    _k("ac_option", "honoured", _optional(integer), "Only null.", accept=(None,)),
    _k("low_cpu_ram", "mapped", boolean, "Rank 0 streams the weights; host memory stays low either way."),
    # Validation (torchtune 0.6.1's recipes do not read these; later torchtune does, and so does tune run)
    _k("dataset_val._component_", "mapped", text, "A validation dataset: the same builder as dataset, read "
       "with its format and columns; its split, data_dir or data_files and source are its own, its other "
       "arguments must equal dataset's. val_loss= lines every run_val_every_n_steps and at the end.",
       "val_dataset_split"),
    _k("dataset_val.*", "honoured", anything, "As dataset.* (split: val_dataset_split, data_dir or "
       "data_files: val_dataset_dir)."),
    _k("run_val_every_n_steps", "honoured", _optional(integer), "Steps between validations (null: at the end "
       "only).", "eval_every"),
    _k("batch_size_val", "mapped", integer, "Validation runs in micro-batches of batch_size (the loss is the "
       "same)."),
    # No effect on results or memory: one warning when given
    *(_k(name, "cosmetic", anything, note) for name, note in (
        ("device", "The trainer uses the GPUs it is given (CPU without one)."),
        ("log_level", "The trainer logs at INFO."),
        ("log_peak_memory_stats", "The trainer logs peak memory in its progress lines."),
        ("cudnn_deterministic_mode", "Not set by the trainer."),
        ("enable_async_checkpointing", "Checkpoints are written synchronously (same content)."),
    )),
]  # fmt: skip
BY_NAME = {k.name: k for k in KEYS}
# Keys copied as they are onto their TrainConfig field (null: the trainer's default).
DIRECT = ("output_dir", "checkpointer.checkpoint_dir", "epochs", "optimizer.lr", "log_every_n_steps", "dtype",
          "enable_activation_checkpointing", "seed", "shuffle", "loss.beta",
          "loss.label_smoothing")  # fmt: skip


@dataclass(frozen=True)
class Builder:
    """A torchtune dataset builder as the trainer reads it: its format, arguments and fixed columns."""

    fmt: str  # dataset_format (preference builders: "preference")
    args: tuple[str, ...]  # the builder's arguments (keys under dataset.)
    train_on_input: bool = False
    columns: dict[str, str] = field(default_factory=dict)  # format column -> the dataset's, unless mapped


SFT_ARGS = ("source", "column_map", "train_on_input", "new_system_prompt", "packed", "filter_fn", "split",
            "data_files", "data_dir")  # fmt: skip
PREF_ARGS = tuple(a for a in SFT_ARGS if a != "packed")
ALPACA_ARGS = tuple(a for a in SFT_ARGS if a != "new_system_prompt")
BUILDERS = {
    "torchtune.datasets.alpaca_dataset": Builder("alpaca", ALPACA_ARGS, train_on_input=True),
    "torchtune.datasets.alpaca_cleaned_dataset": Builder("alpaca", ALPACA_ARGS, train_on_input=True),
    "torchtune.datasets.instruct_dataset": Builder("input_output", SFT_ARGS),
    "torchtune.datasets.chat_dataset": Builder(
        "messages", (*(a for a in SFT_ARGS if a != "column_map"), "conversation_column", "conversation_style")
    ),
    "torchtune.datasets.slimorca_dataset": Builder(
        "messages", SFT_ARGS, columns={"messages": "conversations"}
    ),
    "torchtune.datasets.grammar_dataset": Builder("input_output", SFT_ARGS),
    "torchtune.datasets.samsum_dataset": Builder(
        "input_output", SFT_ARGS, columns={"input": "dialogue", "output": "summary"}
    ),
    "torchtune.datasets.cnn_dailymail_articles_dataset": Builder(
        "text", ("source", "max_seq_len", "filter_fn", "split", "data_files", "data_dir"),
        columns={"text": "article"},
    ),
    "torchtune.datasets.wikitext_dataset": Builder(
        "text", ("source", "subset", "max_seq_len", "packed", "filter_fn", "split", "data_files", "data_dir"),
        columns={"text": "page"},
    ),
    "torchtune.datasets.text_completion_dataset": Builder(
        "text", ("source", "column", "add_eos", "packed", "split_across_pack", "split", "filter_fn",
                 "data_files", "data_dir"),
    ),
    "torchtune.datasets.preference_dataset": Builder("preference", PREF_ARGS),
    "torchtune.datasets.stack_exchange_paired_dataset": Builder(
        "preference", tuple(a for a in PREF_ARGS if a != "new_system_prompt"),
        columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    ),
    "torchtune.datasets.hh_rlhf_helpful_dataset": Builder("preference", PREF_ARGS),
}  # fmt: skip
FILE_TYPES = ("json", "csv", "parquet", "arrow", "text", "xml")


def spec_of(key: str, builder: str | None) -> Key | None:
    """The table's entry for a key (profiler.* by its group), None if unknown; dataset arguments are
    checked against the builder's (dataset_val's are parsed as dataset's)."""
    group, _, arg = key.partition(".")
    if group in ("dataset", "dataset_val") and arg and arg != "_component_" and builder in BUILDERS:
        return BY_NAME[f"dataset.{arg}"] if arg in BUILDERS[builder].args else None
    if key in BY_NAME:
        return BY_NAME[key]
    group = key.split(".", 1)[0]
    return BY_NAME.get(f"{group}.*")


def unknown(key: str, builder: str | None = None) -> ConfigError:
    if key.startswith("dataset.") and builder in BUILDERS:
        args = BUILDERS[builder].args
        close = difflib.get_close_matches(key.split(".", 1)[1], args, n=1, cutoff=0.5)
        hint = f"did you mean dataset.{close[0]}? " if close else ""
        return ConfigError(
            f"{key}: {hint}{builder.rsplit('.', 1)[-1]} takes {', '.join(args)} (docs/trainer.md)"
        )
    candidates = [k.name for k in KEYS if not k.name.endswith("*")]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
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
    overrides: dict[str, Any]  # key -> raw value (DELETE for ~key), in order (a later one wins)


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


USAGE = (
    "usage: tune run [--rdzv_endpoint=HOST:PORT] RECIPE --config CONFIG [key=value ...] "
    "(or tune ls, tune cp CONFIG FILE, tune validate FILE)"
)


def parse_command(argv: list[str]) -> Command:
    """`run [launcher flags] RECIPE --config CONFIG key=value ...` into its parts (no value parsed yet)."""
    if not argv or argv[0] != "run":
        raise ConfigError(USAGE)
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
                raise ConfigError("--config needs a config name (e.g. llama3_2/1B_lora) or a file")
            config, j = rest[j + 1], j + 2
            continue
        if arg.startswith("--config="):
            config, j = arg.split("=", 1)[1], j + 1
            continue
        if arg.startswith("~") and len(arg) > 1 and "=" not in arg:
            overrides[arg[1:]] = DELETE
            j += 1
            continue
        key, eq, value = arg.partition("=")
        if not eq or not key or key.startswith(("-", "~")):
            raise ConfigError(f"unexpected argument {arg!r}: torchtune overrides are key=value (or ~key)")
        overrides[key] = unquote(value) if value else None  # OmegaConf: `key=` is null, `key=""` empty
        j += 1
    if config is None:
        raise ConfigError(f"tune run {recipe}: --config CONFIG is missing (e.g. llama3_2/1B_lora)")
    return Command(launcher, recipe, config, overrides)


def unquote(value: str) -> str:
    """`"Answer briefly."` -> `Answer briefly.`: one pair of matching quotes around a value is quoting (as
    OmegaConf reads a torchtune override; they reach us when no shell removed them, e.g. a pod's args)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


# ---------------------------------------------------------------- config files


VALUE_MAPPINGS = ("column_map", "checkpoint_files")  # keys whose value is a mapping, not a group of keys


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Nested groups as dotted keys (`optimizer: {lr: 1}` -> `optimizer.lr`); a dataset list stays a list."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in VALUE_MAPPINGS:
            out.update(flatten(value, f"{name}."))
        elif name == "dataset" and isinstance(value, list):
            out[name] = [flatten(d) if isinstance(d, dict) else d for d in value]
        else:
            out[name] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        return flatten(values.yaml_file(path))
    except values.BadValue as why:
        raise ConfigError(f"--config {path} {why}") from None


def load_config(config: str) -> tuple[dict[str, Any], bool]:
    """The keys of CONFIG, a published name (with or without .yaml) or a file, and whether it is a file.

    As in torchtune, a published name wins over a file of the same name."""
    name = config.removesuffix(".yaml")
    if name in CONFIGS:
        return dict(CONFIGS[name]), False
    path = Path(config)
    if path.is_file():
        return read_config_file(path), True
    close = difflib.get_close_matches(name, list(CONFIGS), n=3, cutoff=0.6)
    hint = f"; nearest: {', '.join(close)}" if close else ""
    raise ConfigError(
        f"--config {config}: neither a config of torchtune {VERSION} nor a file{hint} (tune ls lists them)"
    )


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The config's keys, then the command line's: `group=X` sets `group._component_` when the group has one
    (torchtune's rule, so `dataset=torchtune.datasets.instruct_dataset` picks a builder); `~key` removes a
    key and its group."""
    out = dict(base)
    for key, raw in overrides.items():
        if raw is DELETE:
            dropped = [k for k in out if k == key or k.startswith(f"{key}.")]
            if not dropped:
                raise ConfigError(f"~{key}: the config has no key {key} to remove")
            for k in dropped:
                del out[k]
            continue
        if (f"{key}._component_" in out or key == "dataset") and not isinstance(out.get(key), list):
            key = f"{key}._component_"
        out[key] = raw
    return out


INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def interpolate(flat: dict[str, Any]) -> dict[str, Any]:
    """`${output_dir}` and `${output_dir}/logs` resolved against the merged config (as OmegaConf does)."""

    def value_of(name: str, seen: tuple[str, ...]) -> Any:
        if ":" in name:
            raise ConfigError(f"{seen[0]}: ${{{name}}}: resolvers are not supported; give the value itself")
        if name in seen:
            raise ConfigError(f"{seen[0]}: ${{{name}}} refers to itself")
        if name not in flat:
            raise ConfigError(f"{seen[0]}: ${{{name}}} names no key of the config")
        return resolve(flat[name], (*seen, name))

    def resolve(value: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(value, list):  # a list of datasets: each one's values
            return [{k: resolve(v, seen) for k, v in d.items()} if isinstance(d, dict) else d for d in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = INTERPOLATION.fullmatch(value)
        if whole:
            return value_of(whole.group(1), seen)
        return INTERPOLATION.sub(lambda m: str(value_of(m.group(1), seen)), value)

    return {k: resolve(v, (k,)) for k, v in flat.items()}


# ---------------------------------------------------------------- translation


def module_names(model_dir: str | None) -> dict[str, list[str]]:
    """torchtune's layer names -> this model's module names, from its config.json's model_type."""
    names = {**ATTENTION, "mlp": MLP, "output": OUTPUT}
    return {**names, **MODULE_NAMES.get(model_config(model_dir).get("model_type") or "", {})}


def model_config(model_dir: str | None) -> dict:
    try:
        config = json.loads((Path(model_dir or "") / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def tokenizer_tokens(model_dir: str | None) -> set[str] | None:
    """The added (special) tokens of the model folder's tokenizer.json; None when there is none to read (the
    folder not there yet, as for `tune validate`: the trainer then checks the tokens as it renders rows)."""
    try:
        added = json.loads((Path(model_dir or "") / "tokenizer.json").read_text()).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return None
    return {t.get("content") for t in added if isinstance(t, dict)}


def lora_targets(tt: dict[str, Any], model_dir: str | None) -> list[str]:
    """lora_target_modules from model.lora_attn_modules, apply_lora_to_mlp and apply_lora_to_output."""
    attn = tt.get("model.lora_attn_modules")
    mlp, output = tt.get("model.apply_lora_to_mlp", False), tt.get("model.apply_lora_to_output", False)
    if attn is None:
        raise ConfigError("model.lora_attn_modules is missing: a LoRA recipe needs it (e.g. [q_proj,v_proj])")
    bad = [name for name in attn if name not in ATTENTION]
    if bad:
        raise ConfigError(f"model.lora_attn_modules: {', '.join(bad)} is not one of {', '.join(ATTENTION)}")
    names = module_names(model_dir)
    targets: list[str] = []
    for group in [*attn, *(["mlp"] if mlp else []), *(["output"] if output else [])]:
        targets += [n for n in names[group] if n not in targets]
    if not targets:
        raise ConfigError("no LoRA target: give model.lora_attn_modules or set model.apply_lora_to_mlp=True")
    return targets


def recipe_method(recipe: str) -> str:
    """lora or full, from the recipe name; unknown recipes refused."""
    methods = {**RECIPES, **DPO_RECIPES}
    if recipe not in methods:
        close = difflib.get_close_matches(recipe, list(methods), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown recipe {recipe!r}{hint} (recipes: {', '.join(methods)})")
    return methods[recipe]


@dataclass
class Resolved:
    """A config after merging, interpolation and parsing: torchtune's keys with parsed values."""

    tt: dict[str, Any]
    warnings: list[str]


def _fmt(value: Any) -> str:
    return "null" if value is None else str(value)


def parse_keys(flat: dict[str, Any], user_keys: set[str], recipe: str) -> Resolved:
    """Every key through the table: unknown keys and refused values stop here, cosmetic ones the user gave
    warn once each."""
    if isinstance(flat.get("dataset"), list):  # several datasets: each entry is parsed as `dataset` alone
        entries = []
        for i, entry in enumerate(flat["dataset"]):
            if not isinstance(entry, dict) or "_component_" not in entry:
                raise ConfigError(
                    f"dataset[{i}]: expected a builder's mapping (_component_: ... and its arguments)"
                )
            try:
                entries.append(parse_keys({f"dataset.{k}": v for k, v in entry.items()}, set(), recipe).tt)
            except ConfigError as exc:
                raise ConfigError(f"dataset[{i}]: {exc}") from None
        rest = parse_keys({k: v for k, v in flat.items() if k != "dataset"}, user_keys, recipe)
        rest.tt["dataset"] = entries
        return rest
    builder = flat.get("dataset._component_")
    if builder is not None and builder not in BUILDERS:
        close = difflib.get_close_matches(str(builder), list(BUILDERS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"dataset._component_={builder}: {hint}the builders tune run reads are "
            f"{', '.join(b.rsplit('.', 1)[-1] for b in BUILDERS)}"
        )
    tt, warnings = {}, []
    for key, raw in flat.items():
        spec = spec_of(
            key, flat.get("dataset_val._component_") if key.startswith("dataset_val.") else builder
        )
        if spec is None:
            raise unknown(key, builder)
        where = f"{key}={_fmt(raw)}"
        if spec.kind == "refused":
            raise ConfigError(f"{where}: {spec.note}")
        value = spec.parse(key, raw)
        if key == "optimizer.betas":
            value = tuple(number(key, v) for v in value)
        if spec.accept is not None and value not in spec.accept:
            raise ConfigError(f"{where}: {spec.note}")
        if spec.kind == "cosmetic" and key in user_keys:
            warnings.append(f"{where} has no effect in the llm-trainer: {spec.note}")
        tt[key] = value
    return Resolved(tt, warnings)


def optimizer_settings(tt: dict[str, Any]) -> dict[str, Any]:
    """optimizer._component_ onto TrainConfig: AdamW (and Adam without weight decay) always; the others onto
    the trainer's `optimizer` choices where this build has them."""
    component = tt.get("optimizer._component_", "torch.optim.AdamW")
    decay = tt.get("optimizer.weight_decay")
    choices = {  # torchtune component -> the trainer's optimizer choice (and the component's default decay)
        "torch.optim.AdamW": ("adamw", 0.01),
        "torch.optim.Adam": ("adamw", 0.0),
        "torch.optim.SGD": ("sgd", 0.0),
        "bitsandbytes.optim.AdamW8bit": ("adamw_8bit", 0.01),
        "bitsandbytes.optim.PagedAdamW8bit": ("paged_adamw_8bit", 0.01),
    }
    if component not in choices:
        raise ConfigError(
            f"optimizer._component_={component}: not available in the llm-trainer; use torch.optim.AdamW"
            + (
                " (bitsandbytes.optim.PagedAdamW8bit where the trainer has it)"
                if "Paged" in component
                else ""
            )
        )
    choice, default_decay = choices[component]
    decay = default_decay if decay is None else decay
    if component == "torch.optim.Adam" and decay:
        raise ConfigError(
            f"optimizer._component_=torch.optim.Adam with weight_decay={decay}: Adam's L2 penalty is not "
            "AdamW's decoupled decay; use torch.optim.AdamW or weight_decay=0"
        )
    values: dict[str, Any] = {"weight_decay": decay}
    if choice != "adamw":
        options = field_types().get("optimizer")
        choices_here = _choices("optimizer")
        if options is None or choice not in choices_here:
            raise ConfigError(
                f"optimizer._component_={component}: this build of the llm-trainer has no {choice} "
                "optimizer; use torch.optim.AdamW"
            )
        values["optimizer"] = choice
    return values


def _choices(name: str) -> tuple[str, ...]:
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.metadata.get("choices") or ()
    return ()


def scale_settings(tt: dict[str, Any], world: int) -> dict[str, Any]:
    """The memory and scale keys onto the trainer's own, where this build has them; refused otherwise."""
    have = field_types()
    values: dict[str, Any] = {}

    def need(key: str, name: str, what: str) -> None:
        if name not in have:
            raise ConfigError(f"{key}={_fmt(tt[key])}: {what} is not in this build of the llm-trainer")

    if tt.get("fsdp_cpu_offload"):
        need("fsdp_cpu_offload", "cpu_offload", "offloading parameters and optimizer state to the CPU")
        values["cpu_offload"] = True
    if tt.get("optimizer_in_bwd"):
        need("optimizer_in_bwd", "optimizer_in_backward", "stepping the optimizer in the backward pass")
        values["optimizer_in_backward"] = "true"  # False (most configs) leaves auto: the same results
    shard, replicate = tt.get("data_parallel_shard_dim", -1), tt.get("data_parallel_replicate_dim", 1)
    if replicate != 1 or shard != -1:
        key = "data_parallel_replicate_dim" if replicate != 1 else "data_parallel_shard_dim"
        need(
            key, "shard_group_size", "hybrid sharding (data_parallel_shard_dim x data_parallel_replicate_dim)"
        )
        if replicate < 1 or shard == 0 or shard < -1:
            raise ConfigError(f"{key}={_fmt(tt[key])}: expected a positive size (shard: -1 for all ranks)")
        if shard == -1 and world % replicate:
            raise ConfigError(
                f"data_parallel_replicate_dim={replicate} does not divide the world size {world}"
            )
        shard = world // replicate if shard == -1 else shard
        if shard * replicate != world:  # torchtune's ParallelDims refuses the same
            raise ConfigError(
                f"data_parallel_shard_dim x data_parallel_replicate_dim = {shard} x {replicate}, not the "
                f"world size {world}"
            )
        values.update(sharding="hybrid" if replicate > 1 else "full", shard_group_size=shard)
    return values


def metric_settings(tt: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """metric_logger onto report_to, disk_log_dir and the trackers' names (run_name, experiment_name,
    tensorboard_dir)."""
    component = tt.get("metric_logger._component_")
    prefix = "torchtune.training.metric_logging."
    trackers = {"TensorBoardLogger": "tensorboard", "WandBLogger": "wandb", "MLFlowLogger": "mlflow"}
    local = ("DiskLogger", "StdoutLogger")
    takes = {  # the arguments of each logger that have a meaning here, besides log_dir
        "tensorboard": ("organize_logs",),
        "wandb": ("project", "name"),
        "mlflow": ("experiment_name", "run_name"),
    }
    extra = sorted(k for k in tt if k.startswith("metric_logger.") and k not in
                   ("metric_logger._component_", "metric_logger.log_dir"))  # fmt: skip
    short = str(component).removeprefix(prefix)
    if component is None or short in local:
        if extra:
            raise ConfigError(f"{extra[0]}: {component or 'the metric logger'} takes only log_dir")
        if short == "DiskLogger":
            return {"disk_log_dir": tt.get("metric_logger.log_dir") or f"{output_dir}/logs"}
        return {}
    if not str(component).startswith(prefix) or short not in trackers:
        names = ", ".join(prefix + n for n in (*local, *trackers))
        raise ConfigError(f"metric_logger._component_={component}: expected one of {names}")
    tracker = trackers[short]
    values: dict[str, Any] = {"report_to": [tracker]}
    for key in extra:
        if key.split(".", 1)[1] not in takes[tracker]:
            raise ConfigError(f"{key}: {short} does not take {key.split('.', 1)[1]} (docs/trainer.md)")
        if BY_NAME[key].field and tt[key] is not None:
            values[BY_NAME[key].field] = tt[key]
    if tracker == "tensorboard" and tt.get("metric_logger.log_dir"):
        values["tensorboard_dir"] = tt["metric_logger.log_dir"]
    return values


def dataset_settings(tt: dict[str, Any], dpo: bool) -> dict[str, Any]:
    """The dataset builder and its arguments onto dataset_format, column_map, train_on_prompt ..."""
    builder_name = tt.get("dataset._component_")
    values: dict[str, Any] = {}
    if builder_name is None:
        builder = None
    else:
        builder = BUILDERS[builder_name]
        if (builder.fmt == "preference") != dpo:
            kind = "preference pairs" if dpo else "supervised samples"
            raise ConfigError(f"dataset._component_={builder_name}: this recipe trains on {kind}")
    columns = dict(builder.columns) if builder else {}
    user_map = tt.get("dataset.column_map")
    if user_map is not None:
        if builder_name and builder_name.endswith("slimorca_dataset"):
            user_map = {"messages" if k == "conversations" else k: v for k, v in user_map.items()}
        allowed = {
            "alpaca": ("instruction", "input", "output"), "input_output": ("input", "output"),
            "messages": ("messages",), "preference": ("prompt", "chosen", "rejected"),
        }.get(builder.fmt if builder else "input_output", ())  # fmt: skip
        bad = sorted(set(user_map) - set(allowed))
        if bad:
            what = builder_name.rsplit(".", 1)[-1] if builder_name else "instruct_dataset"
            raise ConfigError(
                f"dataset.column_map: {what} columns are {', '.join(allowed)}, not {', '.join(bad)}"
            )
        if builder_name == "torchtune.datasets.samsum_dataset":
            columns = {}  # torchtune's `column_map or {...}`: a given map replaces samsum's columns
        columns.update(user_map)
    if "dataset.conversation_column" in tt:
        columns["messages"] = tt["dataset.conversation_column"]
    if "dataset.column" in tt:
        columns["text"] = tt["dataset.column"]
    if builder_name == "torchtune.datasets.chat_dataset":
        for arg in ("conversation_column", "conversation_style"):
            if f"dataset.{arg}" not in tt:
                raise ConfigError(f"dataset.{arg} is missing: chat_dataset needs it")
    if (
        tt.get("dataset.packed")
        and builder
        and builder.fmt == "text"
        and tt.get("dataset.split_across_pack", True)
    ):
        if "split_across_pack" not in builder.args:
            raise ConfigError(
                f"dataset.packed=True: {builder_name.rsplit('.', 1)[-1]} cuts samples across packs, which "
                "the llm-trainer never does; use torchtune.datasets.text_completion_dataset with its column, "
                "packed=True and split_across_pack=False (or dataset.packed=False)"
            )
        raise ConfigError(
            "dataset.split_across_pack=True: the llm-trainer never cuts a sample across packs; "
            "set dataset.split_across_pack=False (or dataset.packed=False)"
        )
    values["column_map"] = {k: v for k, v in columns.items() if k != v}
    if builder and not dpo:
        fmt = builder.fmt
        if builder_name == "torchtune.datasets.instruct_dataset" and user_map is None:
            # Without a column_map, alpaca-style data (instruction/input/output) keeps its instruction: auto
            # reads it as alpaca, and data with only input/output columns as input_output.
            fmt = "auto"
        values["dataset_format"] = fmt
    train_on_input = tt.get("dataset.train_on_input", builder.train_on_input if builder else False)
    if train_on_input and dpo:
        raise ConfigError("dataset.train_on_input=True: DPO compares the responses only; set it to False")
    values["train_on_prompt"] = train_on_input
    if builder and builder.fmt == "alpaca":
        values["alpaca_preamble"] = True  # AlpacaToMessages' fixed prompt, word for word
    if "dataset.add_eos" in tt:
        values["add_eos"] = tt["dataset.add_eos"]
    if tt.get("dataset.new_system_prompt") is not None:  # "" too: torchtune adds an empty system message
        values["system_prompt"] = tt["dataset.new_system_prompt"]
        if not values["system_prompt"]:
            values["empty_system_prompt"] = True
    if "dataset.packed" in tt:
        values["packing"] = tt["dataset.packed"]
    if "dataset.split" in tt:
        values["dataset_split"] = tt["dataset.split"]
    source = tt.get("dataset.source")
    if source in FILE_TYPES:
        values["dataset_source"] = source
    elif source is not None:
        log.info("dataset.source=%s: reading the dataset folder (the dataset initializer's copy)", source)
    if "dataset.data_dir" in tt and "dataset.data_files" in tt:
        raise ConfigError("give dataset.data_dir or dataset.data_files, not both")
    for key in ("dataset.data_dir", "dataset.data_files"):
        if key in tt:
            values["dataset_dir"] = tt[key]
    length = tt.get("dataset.max_seq_len")
    if length is not None and length != tt.get("tokenizer.max_seq_len"):
        raise ConfigError(
            f"dataset.max_seq_len={length}: the llm-trainer truncates every dataset at "
            f"tokenizer.max_seq_len; set tokenizer.max_seq_len={length} (or dataset.max_seq_len=null)"
        )
    if builder_name == "torchtune.datasets.wikitext_dataset":
        # The Hub repository holds every configuration in its own folder; read only the chosen one.
        folder = Path(values.get("dataset_dir", TrainConfig().dataset_dir))
        subset = folder / str(tt.get("dataset.subset", "wikitext-103-v1"))
        if subset.is_dir():
            values["dataset_dir"] = str(subset)
    return {**values, **validation_settings(tt)}


def datasets_settings(tt: dict[str, Any], dpo: bool) -> dict[str, Any]:
    """One dataset, or a list (torchtune's ConcatDataset): the first onto the top-level keys, the others
    onto more_datasets, each with all of its data keys (nothing inherited from the first)."""
    entries = tt.get("dataset")
    if not isinstance(entries, list):
        return dataset_settings(tt, dpo)
    if any(k.startswith("dataset_val.") for k in tt):
        raise ConfigError("dataset_val with a list of datasets: give one training dataset, or no dataset_val")
    base = {k: v for k, v in tt.items() if k != "dataset"}
    settings = [dataset_settings({**base, **entry}, dpo) for entry in entries]
    ours = TrainConfig()
    whole = [{k: s.get(k, getattr(ours, k)) for k in DATASET_KEYS} for s in settings]
    seen: dict[tuple, int] = {}
    for i, one in enumerate(whole):
        where = (one["dataset_dir"], one["dataset_split"])
        if where in seen:
            raise ConfigError(
                f"dataset[{i}] reads the same files as dataset[{seen[where]}] ({where[0]}, {where[1]}): give "
                "each its data_dir or data_files (or its own split)"
            )
        seen[where] = i
    packing = {s.get("packing", False) for s in settings}
    if len(packing) > 1:
        raise ConfigError("dataset: packed must be the same for every dataset of the list")
    return {**settings[0], "more_datasets": whole[1:]}


OWN_VAL_ARGS = ("split", "data_dir", "data_files", "source")  # dataset_val's own; the others are dataset's


def validation_settings(tt: dict[str, Any]) -> dict[str, Any]:
    """dataset_val (the same builder as dataset, its own split and files) and run_val_every_n_steps."""
    values: dict[str, Any] = {}
    if tt.get("run_val_every_n_steps") is not None:
        values["eval_every"] = tt["run_val_every_n_steps"]
    val_keys = {k.split(".", 1)[1]: v for k, v in tt.items() if k.startswith("dataset_val.")}
    if not val_keys:
        return values
    builder = val_keys.get("_component_")
    if builder is None:
        raise ConfigError("dataset_val._component_ is missing: give the validation dataset's builder")
    if builder != tt.get("dataset._component_"):
        raise ConfigError(
            f"dataset_val._component_={builder}: validation reads the training data's format, so give the "
            f"same builder as dataset ({tt.get('dataset._component_')}) with its own split or files"
        )
    defaults = {"train_on_input": BUILDERS[builder].train_on_input, "packed": False, "add_eos": True,
                "split_across_pack": True}  # fmt: skip
    for arg in sorted(set(BUILDERS[builder].args) - set(OWN_VAL_ARGS)):
        val, train = val_keys.get(arg, defaults.get(arg)), tt.get(f"dataset.{arg}", defaults.get(arg))
        if val != train:
            raise ConfigError(
                f"dataset_val.{arg}={_fmt(val)}: validation is read like the training data, with "
                f"dataset.{arg}={_fmt(train)}; give the same value"
            )
    if "data_dir" in val_keys and "data_files" in val_keys:
        raise ConfigError("give dataset_val.data_dir or dataset_val.data_files, not both")
    source = val_keys.get("source")
    if source in FILE_TYPES and source != tt.get("dataset.source", source):
        raise ConfigError(
            f"dataset_val.source={source}: the validation files must be of dataset.source's type"
        )
    values["val_dataset_split"] = val_keys.get("split", "train")
    values["val_dataset_dir"] = val_keys.get("data_dir") or val_keys.get("data_files") or ""
    return values


def check_weight_files(key: str, files: list[str], model_dir: str) -> None:
    """checkpoint_files: each exists in the folder, and they are all its weight files (the trainer reads the
    folder). Not checked when the folder is not there yet (tune validate before the initializers ran)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{key}: {missing[0]} is not in {folder}")
    weights = {p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")}
    other = sorted(weights - set(files) - {"training_args.bin"})
    if other and not weights <= set(files):
        raise ConfigError(
            f"{key}: {folder} also holds {other[0]}; the llm-trainer reads every weight file of the folder, "
            "so list them all (or give a folder with only these)"
        )


def tokenizer_settings(
    tt: dict[str, Any], model_dir: str, dpo: bool, values: dict[str, Any]
) -> dict[str, Any]:
    """tokenizer._component_ and tokenizer.prompt_template onto message_format and prompt_template: the
    family's tokenize_messages, refused where the model folder's tokenizer lacks one of its special tokens or
    the component is none of the families'; without tokenizer._component_ plain (the model's chat template).
    prompt_template not given is the tokenizer's default, null none."""
    tokenizer = str(tt.get("tokenizer._component_", ""))
    fix = ("give the tokenizer._component_ of the model's family, or remove the key (~tokenizer._component_) "
           "to render rows with the model's own chat template")  # fmt: skip
    if tokenizer and tokenizer not in MESSAGE_FORMATS:
        names = ", ".join(c.rsplit(".", 1)[-1] for c in MESSAGE_FORMATS)
        raise ConfigError(
            f"tokenizer._component_={tokenizer}: rows are rendered as torchtune {VERSION}'s text tokenizers "
            f"render them ({names}), and this is none of them; {fix}"
        )
    fmt = MESSAGE_FORMATS.get(tokenizer, "plain")
    needed = GEMMA_TOKENS if tokenizer.endswith("gemma_tokenizer") else MESSAGE_TOKENS.get(fmt, ())
    have = tokenizer_tokens(model_dir)
    missing = [t for t in needed if have is not None and t not in have]
    if missing:
        raise ConfigError(
            f"tokenizer._component_={tokenizer}: the tokenizer in {model_dir} has no {missing[0]} token, "
            f"which torchtune's {tokenizer.rsplit('.', 1)[-1]} writes into every row; {fix}"
        )
    given = "tokenizer.prompt_template" in tt
    template = tt["tokenizer.prompt_template"] if given else DEFAULT_TEMPLATES.get(tokenizer)
    out: dict[str, Any] = {"message_format": fmt} if fmt != "plain" else {}
    if template is None:
        return out
    name = PROMPT_TEMPLATES[template]
    if fmt == "plain" and (dpo or name in ("llama2_chat", "mistral_chat")):
        raise ConfigError(
            f"tokenizer.prompt_template={template}: applies only to rows rendered as a torchtune tokenizer "
            "renders them; give tokenizer._component_ or set tokenizer.prompt_template=null"
        )
    each = [values, *values.get("more_datasets", [])]
    systems = [d.get("system_prompt") or d.get("empty_system_prompt") for d in each]
    if name == "mistral_chat" and any(systems):
        raise ConfigError(
            "dataset.new_system_prompt: MistralChatTemplate (mistral_tokenizer's default prompt_template) "
            "takes no system message; drop it or set tokenizer.prompt_template=null"
        )
    return {**out, "prompt_template": name}


def max_seq_length(tt: dict[str, Any], model_dir: str) -> int | None:
    """tokenizer.max_seq_len; null (torchtune: no truncation) is the model's context length."""
    if tt.get("tokenizer.max_seq_len") is not None:
        return tt["tokenizer.max_seq_len"]
    config = model_config(model_dir)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(name), int) and config[name] > 0:
            return config[name]
    return None


def to_train_config(tt: dict[str, Any], recipe: str, world: int) -> dict[str, Any]:
    """TrainConfig values from torchtune's settings (already parsed and checked key by key)."""
    method = recipe_method(recipe)
    dpo = recipe in DPO_RECIPES
    component = str(tt.get("model._component_", ""))
    lora_keys = [k for k in tt if k.startswith("model.") and k != "model._component_" and tt[k] is not False]
    is_lora_model = component.rsplit(".", 1)[-1].startswith(("lora_", "qlora_")) or bool(lora_keys)
    if method == "full" and is_lora_model:
        first = lora_keys[0] if lora_keys else f"model._component_={component}"
        raise ConfigError(f"{first}: the recipe {recipe} trains all weights; use a lora_* recipe for LoRA")
    if method == "lora" and component and not component.rsplit(".", 1)[-1].startswith(("lora_", "qlora_")):
        raise ConfigError(
            f"model._component_={component}: the recipe {recipe} trains LoRA adapters; give a lora_ or "
            "qlora_ model builder (or a full_* recipe)"
        )
    defaults = TrainConfig()
    values: dict[str, Any] = {}
    for key in DIRECT:
        if tt.get(key) is not None:
            values[BY_NAME[key].field] = tt[key]
    model_dir = values.get("model_dir", defaults.model_dir)
    output_dir = values.get("output_dir", defaults.output_dir)
    if tt.get("checkpointer.output_dir") not in (None, output_dir):
        raise ConfigError(
            f"checkpointer.output_dir={tt['checkpointer.output_dir']}: outputs and checkpoints go to "
            f"output_dir ({output_dir}); set it to ${{output_dir}}"
        )
    if "checkpointer.checkpoint_files" in tt:
        check_weight_files("checkpointer.checkpoint_files", tt["checkpointer.checkpoint_files"], model_dir)
    values["max_steps_per_epoch"] = tt.get("max_steps_per_epoch") or 0
    values["max_grad_norm"] = tt.get("clip_grad_norm") or 0.0  # torchtune: null or absent does not clip
    values["resume"] = "auto" if tt.get("resume_from_checkpoint") else "never"
    values["decay_all_parameters"] = True  # torchtune hands every parameter to the optimizer
    values["torchtune_layout"] = True  # output_dir/epoch_{N}/ as well
    if "lr_scheduler._component_" in tt:
        values["lr_scheduler"] = "cosine"
        values["warmup_steps"] = tt.get("lr_scheduler.num_warmup_steps", 0)
        values["warmup_from_zero"] = True  # get_cosine_schedule_with_warmup: lr 0 at step 0
    else:
        if "lr_scheduler.num_warmup_steps" in tt:
            raise ConfigError("lr_scheduler.num_warmup_steps: give lr_scheduler._component_ too (no "
                              "lr_scheduler means a constant learning rate)")  # fmt: skip
        values["lr_scheduler"], values["warmup_steps"] = "constant", 0
    values.update(optimizer_settings(tt))
    values.update(scale_settings(tt, world))
    values.update(metric_settings(tt, output_dir))
    values.update(datasets_settings(tt, dpo))
    values.update(tokenizer_settings(tt, model_dir, dpo, values))
    seq = max_seq_length(tt, model_dir)
    if seq is None and not Path(model_dir).is_dir():
        # No model yet (tune validate, or a run that stops at loading it): nothing to resolve null against.
        seq = defaults.max_seq_length
    elif seq is None:
        raise ConfigError(
            f"tokenizer.max_seq_len is null (no truncation) and {model_dir}/config.json names no "
            "max_position_embeddings: give tokenizer.max_seq_len"
        )
    values["max_seq_length"] = seq
    values["truncation"] = "none" if tt.get("tokenizer.max_seq_len") is None else "torchtune"
    if values["truncation"] == "none" and values.get("packing"):
        raise ConfigError(
            "dataset.packed=True with tokenizer.max_seq_len null: packs need a length (torchtune's "
            "PackedDataset refuses this too); set tokenizer.max_seq_len"
        )
    values["validate_messages"] = not dpo  # torchtune's SFTDataset validates; its PreferenceDataset does not
    micro = tt.get("batch_size", 1)
    accum = tt.get("gradient_accumulation_steps", 1)
    for key, n in (("batch_size", micro), ("gradient_accumulation_steps", accum)):
        if n < 1:
            raise ConfigError(f"{key}={n}: must be >= 1")
    values["micro_batch_size"], values["global_batch_size"] = micro, micro * world * accum
    if method == "full":
        values["method"] = "full"
    else:
        qlora = tt.get("model.quantize_base") or component.rsplit(".", 1)[-1].startswith("qlora_")
        values["method"] = "qlora" if qlora else "lora"
        for key in ("model.lora_rank", "model.lora_alpha", "model.lora_dropout", "model.use_dora"):
            if key in tt:
                values[BY_NAME[key].field] = tt[key]
        values.setdefault("lora_dropout", 0.0)  # torchtune's builders' default
        values["lora_target_modules"] = lora_targets(tt, model_dir)
        values["merge_adapter"] = not tt.get("save_adapter_weights_only", False)
    if dpo:
        values["objective"] = "dpo"
        ref = tt.get("ref_checkpointer.checkpoint_dir")
        if ref is not None and ref != model_dir:
            if recipe != "full_dpo_distributed":
                raise ConfigError(
                    f"ref_checkpointer.checkpoint_dir={ref}: {recipe}'s reference is the base model with the "
                    "adapter off; only full_dpo_distributed reads a reference"
                )
            if "reference_model_dir" not in field_types():
                raise ConfigError(
                    f"ref_checkpointer.checkpoint_dir={ref}: a reference model other than the starting one "
                    "is not in this build of the llm-trainer"
                )
            values["reference_model_dir"] = ref
            if "ref_checkpointer.checkpoint_files" in tt:
                key = "ref_checkpointer.checkpoint_files"
                check_weight_files(key, tt[key], ref)
        if str(tt.get("loss._component_", DPO_LOSS)) != DPO_LOSS:
            raise ConfigError(f"loss._component_={tt['loss._component_']}: a DPO recipe needs {DPO_LOSS}")
    elif tt.get("loss._component_") == DPO_LOSS or "loss.beta" in tt:
        raise ConfigError(f"loss._component_={DPO_LOSS}: use a *_dpo_* recipe for preference training")
    return values


@dataclass
class Translation:
    config: TrainConfig
    warnings: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # torchtune's keys, parsed (for tune cp)


def resolve(cmd: Command) -> tuple[Resolved, dict[str, Any]]:
    """The merged, interpolated and parsed torchtune settings of a command, and its raw merged keys."""
    base, is_file = load_config(cmd.config)
    user_keys = set(cmd.overrides) | (set(base) if is_file else set())
    flat = interpolate(merge(base, cmd.overrides))
    user_keys |= {f"{k}._component_" for k in cmd.overrides}
    return parse_keys(flat, user_keys, cmd.recipe), flat


def translate(cmd: Command, world: int) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig of a `tune run` command at this world size, and the warning lines to print."""
    recipe_method(cmd.recipe)
    resolved, _ = resolve(cmd)
    values = to_train_config(resolved.tt, cmd.recipe, world)
    try:
        return TrainConfig(**values).validate(), resolved.warnings
    except ConfigError as exc:
        # Name the torchtune key that set the refused value.
        keys = [k.name for k in KEYS if k.field and str(exc).startswith(k.field) and k.name in resolved.tt]
        source = keys[0] if keys else None
        where = f"{source}={_fmt(resolved.tt[source])}" if source else f"{cmd.recipe} --config {cmd.config}"
        raise ConfigError(f"{where}: {exc}") from None


def trainer_args(cfg: TrainConfig) -> list[str]:
    """The `--key=value` flags of pkg.trainer for every setting that differs from its default."""
    defaults = TrainConfig()
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, list):
            value = json.dumps(value) if any(isinstance(v, dict) for v in value) else ",".join(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        out.append(f"--{f.name}={value}")
    return out


# ---------------------------------------------------------------- tune ls / cp / validate


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested groups, each group's `_component_` first (as torchtune's files have it)."""
    out: dict[str, Any] = {}
    for key in sorted(flat, key=lambda k: not k.endswith("._component_")):
        node = out
        *groups, last = key.split(".")
        for group in groups:
            node = node.setdefault(group, {})
        node[last] = flat[key]
    order = {k.split(".", 1)[0]: i for i, k in reversed(list(enumerate(flat)))}  # the file's order of groups
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def render_config(name: str) -> str:
    """Our rendering of a published config: its settings as a torchtune YAML file, paths set to the folders
    of a TrainJob, keys with no effect here left out. `tune run --config FILE` reads it back unchanged."""
    flat = {k: v for k, v in CONFIGS[name].items()
            if k not in ("device", "log_level", "log_peak_memory_stats", "optimizer.fused")
            and not k.startswith("profiler.")}  # fmt: skip
    ours = TrainConfig()
    paths = {"output_dir": ours.output_dir, "checkpointer.checkpoint_dir": ours.model_dir,
             "checkpointer.output_dir": "${output_dir}", "dataset.data_dir": ours.dataset_dir}  # fmt: skip
    recipes = [r for r, names in RECIPE_CONFIGS.items() if name in names]
    header = [
        f"# {name}: the settings of torchtune {VERSION}'s published config, as the llm-trainer's tune run",
        f"# reads them (tune run {recipes[0]} --config THIS_FILE). Paths are a TrainJob's folders.",
        "# Every key is listed in docs/trainer.md with what it does here.",
    ]
    body = yaml.safe_dump(unflatten({**paths, **flat}), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def list_configs() -> str:
    width = max(len(r) for r in RECIPE_CONFIGS) + 2
    lines = [f"{'RECIPE':<{width}}CONFIG   (torchtune {VERSION})"]
    for recipe in (*RECIPES, *DPO_RECIPES):
        for i, name in enumerate(RECIPE_CONFIGS.get(recipe, [])):
            lines.append(f"{recipe if i == 0 else '':<{width}}{name}")
    return "\n".join(lines)


def copy_config(argv: list[str]) -> str:
    if len(argv) != 2:
        raise ConfigError("usage: tune cp CONFIG FILE (tune ls lists the configs)")
    name, dest = argv[0].removesuffix(".yaml"), Path(argv[1])
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, list(CONFIGS), n=3, cutoff=0.6)
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"tune cp {argv[0]}: not a config of torchtune {VERSION}{hint} (tune ls lists them)"
        )
    if dest.suffix == "":
        dest = dest.with_suffix(".yaml")
    if dest.exists():
        raise ConfigError(f"tune cp: {dest} exists; give another file name")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(render_config(name))
        tmp.replace(dest)
    except OSError as exc:
        raise ConfigError(f"tune cp: cannot write {dest} ({exc.strerror})") from None
    return f"Copied {name} to {dest}"


def validate_config(argv: list[str]) -> str:
    """`tune validate FILE [RECIPE]`: every key through the table; the recipe is the config's own when it is
    a published name, else lora_finetune_distributed or full_finetune_distributed by the model builder."""
    if len(argv) not in (1, 2):
        raise ConfigError("usage: tune validate FILE [RECIPE]")
    config = argv[0]
    base, _ = load_config(config)
    recipe = argv[1] if len(argv) == 2 else None
    if recipe is None:
        published = [r for r, names in RECIPE_CONFIGS.items() if config.removesuffix(".yaml") in names]
        component = str(base.get("model._component_", "")).rsplit(".", 1)[-1]
        dpo = "DPOLoss" in str(base.get("loss._component_", ""))
        lora = component.startswith(("lora_", "qlora_")) or "model.lora_rank" in base
        recipe = (
            published[0]
            if published
            else (f"{'lora' if lora else 'full'}_{'dpo' if dpo else 'finetune'}_distributed")
        )
    cfg, warnings = translate(Command([], recipe, config, {}), 1)
    lines = [f"warning: {w}" for w in warnings]
    return "\n".join([*lines, f"Config is well-formed! ({recipe}, {cfg.method}, as the llm-trainer runs it)"])


# ---------------------------------------------------------------- launch


def launch_args(cmd: Command):
    """torchrun's parsed arguments for this command (PET_* variables apply as torchrun applies them)."""
    return launch.launch_args(cmd.launcher)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stdout)  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"], ["run", "--help"], ["run", "-h"]):
        print(__doc__)
        return 0
    commands = {"ls": lambda args: list_configs(), "cp": copy_config, "validate": validate_config}
    if argv[0] in commands:
        try:
            print(commands[argv[0]](argv[1:]))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
        return 0
    try:
        cmd = parse_command(argv)
        args = launch_args(cmd)
        world = launch.num_nodes(args.nnodes) * int(args.nproc_per_node)
        cfg, warnings = translate(cmd, world)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    log.info("tune run %s --config %s -> %s", cmd.recipe, cmd.config, " ".join(trainer_args(cfg)))
    return launch.run_workers(args, trainer_args(cfg))


if __name__ == "__main__":
    sys.exit(main())
