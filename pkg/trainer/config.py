"""The trainer's configuration: one flat dataclass that is the YAML schema and the command line.

    torchrun -m pkg.trainer --config job.yaml --max-steps 20 --learning_rate 1e-4

Values come from the defaults below, then the YAML file given with `--config`, then `--key value` flags
(`--max-steps` and `--max_steps` are the same key). Unknown keys and bad values are refused before anything
starts, with the valid keys or values listed. Each field carries `help` (and `choices` where the value is one
of a set) in its metadata, so the docs reference can be generated from this class.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pkg.trainer import values
from pkg.trainer.errors import ConfigError

AUTO_BOOL = ("auto", "true", "false")  # a switch the trainer may also decide (values.auto_boolean)
# Optimizers whose per-parameter steps equal one step over the list, bit for bit (test_in_backward.py,
# test_optimizers.py); bitsandbytes' 8-bit ones are not checked here (CUDA only).
IN_BACKWARD_EXACT = ("adamw", "sgd")


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its documentation (and allowed values) in the metadata."""
    meta = {"help": help, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of the llm-trainer. Key names are a public contract: keep them stable."""

    # Paths (the Kubeflow Trainer v2 workspace layout)
    model_dir: str = opt(
        "/workspace/model", "Pre-trained model (safetensors + tokenizer), as the model initializer leaves it."
    )
    dataset_dir: str = opt(
        "/workspace/dataset", "Dataset files or a save_to_disk folder, as the dataset initializer leaves it."
    )
    output_dir: str = opt(
        "/workspace/output",
        "Where adapter/, model/, checkpoints/, metrics.jsonl, summary.json, loss.png and config.yaml go.",
    )

    # Method
    method: str = opt(
        "lora",
        "Fine-tuning method: LoRA adapters, LoRA on a 4-bit base (bitsandbytes, CUDA or CPU) or all weights.",
        ("lora", "qlora", "full"),
    )
    lora_rank: int = opt(16, "LoRA rank r.")
    lora_alpha: int = opt(32, "LoRA scaling alpha (the update is scaled by alpha / rank).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get adapters: names, or 'all-linear' for every linear layer but the output "
            "head. A YAML list or a comma-separated string.",
            "choices": None,
        },
    )
    use_dora: bool = opt(
        False, "LoRA: weight-decomposed adapters (DoRA), a trained magnitude per output feature."
    )
    merge_adapter: bool = opt(
        False, "LoRA: also write the base model with the adapter merged into output_dir/model/."
    )
    torchtune_layout: bool = opt(
        False,
        "Also present the outputs where torchtune puts them, output_dir/epoch_{N}/ (N: the last epoch, from "
        "0): the adapter and model files as hard links to the same files, nothing copied. tune run sets it.",
    )

    # Objective
    objective: str = opt(
        "sft",
        "Training objective: supervised fine-tuning on responses, or DPO on preference pairs "
        "(prompt/chosen/rejected rows).",
        ("sft", "dpo"),
    )
    dpo_beta: float = opt(
        0.1, "DPO: strength of the pull towards the reference model (IPO: the regularization tau)."
    )
    dpo_loss: str = opt(
        "sigmoid",
        "DPO loss: the DPO paper's sigmoid, or IPO (squared, on per-token mean log-ratios; noisy labels).",
        ("sigmoid", "ipo"),
    )
    reference_model_dir: str = opt(
        "",
        "DPO with method full: the reference model's folder (the same tokenizer); empty: the starting model "
        "(model_dir). LoRA's reference is always the base model with the adapter off.",
    )
    dpo_label_smoothing: float = opt(
        0.0, "DPO sigmoid: assumed fraction of flipped preference labels (conservative DPO), in [0, 0.5)."
    )

    # Schedule
    max_steps: int = opt(0, "Optimizer steps to run; 0 means num_epochs full passes over the data.")
    num_epochs: int = opt(1, "Passes over the training data when max_steps is 0.")
    max_steps_per_epoch: int = opt(
        0, "End each epoch after this many optimizer steps (its other samples are skipped); 0: no cap."
    )
    learning_rate: float = opt(2e-4, "Peak learning rate (AdamW).")
    lr_scheduler: str = opt("cosine", "Learning-rate decay after warmup.", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "Steps of linear warmup from 0 to learning_rate.")
    warmup_from_zero: bool = opt(
        False,
        "Warmup: the first step's learning rate is 0 (transformers' and torchtune's schedules); false: "
        "learning_rate / (warmup_steps + 1).",
    )
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    decay_all_parameters: bool = opt(
        False, "Apply weight_decay to biases and norms too (AdamW over all parameters, as torchtune does)."
    )
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    nan_policy: str = opt(
        "stop",
        "A step whose loss or gradient norm is not finite (NaN, inf): stop the run there (nothing final is "
        "written), or skip that step's update and go on (the run stops after 5 such steps in a row).",
        ("stop", "skip_step"),
    )
    global_batch_size: int = opt(
        16, "Samples (or packed sequences) per optimizer step, whatever the world size."
    )
    micro_batch_size: int = opt(
        2, "Samples per forward pass on each rank; gradient accumulation = global / (micro * world size)."
    )
    seed: int = opt(42, "Seed of the data order, adapter initialization and dropout.")
    shuffle: bool = opt(
        True, "Shuffle the training data each epoch (seeded); false: file order, every epoch."
    )

    # Data
    dataset_format: str = opt(
        "auto",
        "Row format; auto detects it from the column names.",
        ("auto", "alpaca", "messages", "prompt_completion", "text", "input_output"),
    )
    dataset_source: str = opt(
        "auto",
        "Type of the data files; auto goes by their extensions. text: one row per line of .txt files (column "
        "text); xml: one row per .xml file (column xml).",
        ("auto", "json", "csv", "parquet", "arrow", "text", "xml"),
    )
    dataset_split: str = opt(
        "train",
        "Split to train on, with Hugging Face slicing: train, validation, train[:10%], train[100:500].",
    )
    column_map: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Dataset columns under other names: {format column: dataset column}, e.g. "
            "{input: question, output: answer}. A YAML mapping, or the same as a string.",
            "choices": None,
        },
    )
    more_datasets: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "More training datasets, concatenated after dataset_dir's (torchtune's list of "
            "datasets): each a mapping of dataset_dir, dataset_split, dataset_source, dataset_format, "
            "column_map, system_prompt, train_on_prompt, add_eos where it differs from the top-level "
            "keys. A YAML list, or the same as a JSON string.",
            "choices": None,
        },
    )  # fmt: skip
    system_prompt: str = opt(
        "",
        "A system message put first in every sample (it replaces a conversation's own); prompt formats "
        "without a chat template get it as a first paragraph. Never trained, even with train_on_prompt "
        "(torchtune's new_system_prompt).",
    )
    empty_system_prompt: bool = opt(
        False,
        "With system_prompt '': still put an empty system message first in chat formats (torchtune's "
        "new_system_prompt: ''). tune run sets it.",
    )
    validate_messages: bool = opt(
        False,
        "Refuse a conversation (naming its row) unless it is an optional first system message, then user "
        "and assistant turns alternating, at least two messages (torchtune's validate_messages, which its "
        "SFT datasets apply). tune run sets it.",
    )
    max_seq_length: int = opt(1024, "Tokens per sequence; longer samples are truncated.")
    truncation: str = opt(
        "cut",
        "Samples longer than max_seq_length: cut there; torchtune (cut as torchtune 0.6.1's tokenizers do "
        "with a tokenizer.max_seq_len, which also leaves Qwen's final <|im_end|> untrained, even in rows "
        "that fit); none (torchtune's null tokenizer.max_seq_len: a longer sample stops the run, naming "
        "it). tune run sets torchtune or none.",
        ("cut", "torchtune", "none"),
    )
    packing: bool = opt(False, "Pack several samples into each sequence (they never attend to each other).")
    add_eos: bool = opt(
        True,
        "Format text: end each text with the EOS token (false: torchtune's text_completion_dataset "
        "add_eos=False).",
    )
    prompt_template: str = opt(
        "",
        "Wrap every user message (and non-chat prompt) as torchtune's GrammarErrorCorrectionTemplate "
        "(grammar) or SummarizeTemplate (summarize) does; with a message_format other than plain, also "
        "Llama2ChatTemplate (llama2_chat: [INST], <<SYS>>) or MistralChatTemplate (mistral_chat: [INST]). "
        "tune run's tokenizer.prompt_template sets it (not given: the tokenizer's default).",
        ("", "grammar", "summarize", "llama2_chat", "mistral_chat"),
    )
    alpaca_preamble: bool = opt(
        False,
        "Format alpaca: begin each prompt with the Stanford Alpaca preamble ('Below is an instruction that "
        "describes a task...'), as torchtune's alpaca_dataset does (tune run sets it for that builder).",
    )
    message_format: str = opt(
        "plain",
        "How instruct, chat, preference and text rows become tokens: plain (chat rows: the model's chat "
        "template; other rows: prompt + response + EOS) or as torchtune 0.6.1's model tokenizers do: llama3 "
        "(header tokens, <|eot_id|>, BOS/EOS), chatml (Qwen2/2.5's <|im_start|>/<|im_end|>), llama2 (Llama "
        "2, Mistral, Gemma: BOS and EOS around each turn, no special tokens), phi3 (<|user|>, <|end|>) or "
        "phi4 (<|im_start|>, <|im_sep|>); tune run sets it from tokenizer._component_.",
        ("plain", "llama3", "chatml", "llama2", "phi3", "phi4"),
    )
    train_on_prompt: bool = opt(
        False, "Also train on prompt tokens (by default only responses count in the loss)."
    )
    val_fraction: float = opt(0.0, "Fraction of the samples held out for validation (0 disables validation).")
    val_dataset_split: str = opt(
        "",
        "Validate on this split (with slicing, e.g. validation or train[95%:]) of val_dataset_dir instead of "
        "holding out val_fraction; read with the training data's format and columns. Empty: val_fraction.",
    )
    val_dataset_dir: str = opt(
        "", "The validation dataset's files or folder (with val_dataset_split); empty: dataset_dir."
    )
    eval_every: int = opt(
        0,
        "Run validation every N steps (and always at the end when there is a validation set); 0: only at "
        "the end.",
    )

    # Checkpoints
    save_every: int = opt(
        100, "Write a resumable checkpoint every N steps into output_dir/checkpoints/; 0 disables."
    )
    keep_last: int = opt(2, "Checkpoints to keep (the oldest are deleted).")
    resume: str = opt(
        "auto",
        "'auto' continues from the newest complete checkpoint, 'never' starts over, or a checkpoint path.",
    )

    # Performance
    precision: str = opt(
        "auto",
        "Compute precision: auto is bf16 on a GPU that supports it, fp32 otherwise.",
        ("auto", "bf16", "fp32"),
    )
    activation_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    # The fused head (loss.py) keeps one fp32 [tokens, vocabulary] block of a chunk alive (311 MB for 512
    # tokens at a vocabulary of 151,936); a head called as a module (LoRA on it) about 4 in the backward.
    loss_chunk_size: int = opt(
        512,
        "Target tokens per chunk of the output head and cross-entropy: at most this many tokens' logits "
        "exist at once (recomputed in the backward). Lower it to save memory with a large vocabulary. "
        "With vocab_parallel, world size times as many tokens over each rank's 1/world of the vocabulary.",
    )
    vocab_parallel: str = opt(
        "auto",
        "Under FSDP: split the input embedding and the output head by vocabulary rows across the ranks of "
        "the shard group (every rank; a node's under hybrid sharding) and exchange activations instead of "
        "gathering the two matrices (less memory per rank). auto: when group size x micro_batch_size x "
        "max_seq_length <= 2 x the vocabulary (then it also moves fewer bytes); always; never (FSDP units).",
        ("auto", "always", "never"),
    )
    sharding: str = opt(
        "auto",
        "How FSDP spreads the weights: full shards them over every rank; hybrid shards them within groups of "
        "shard_group_size ranks (a node) and replicates them across groups, so per-layer gathers stay on "
        "the node and only gradients cross nodes; auto is hybrid when the job spans several nodes and the "
        "estimated per-rank memory (pkg.trainer.plan) fits one group, else full.",
        ("auto", "full", "hybrid"),
    )
    shard_group_size: int = opt(
        0,
        "Ranks that share one copy of the weights under hybrid sharding; 0: the processes of one node "
        "(torchrun's local world size). Must divide the world size.",
    )
    cpu_offload: bool = opt(
        False,
        "Keep the sharded weights, gradients and optimizer state in host memory (FSDP2's CPU offload; "
        "the optimizer step runs on the CPU). Saves GPU memory for a slower step.",
    )
    optimizer: str = opt(
        "adamw",
        "adamw (fused where supported); adamw_8bit and paged_adamw_8bit (bitsandbytes, one CUDA GPU: a "
        "quarter of AdamW's state); sgd (no state, momentum 0).",
        ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"),
    )
    optimizer_in_backward: str = opt(
        "auto",
        "method full: step each weight as soon as the backward has its gradient and free that gradient, "
        "so no whole-model gradient is ever held. auto: exactly where that gives the same updates as "
        "stepping after the backward (method full, gradient accumulation 1, max_grad_norm 0, nan_policy "
        "stop, optimizer adamw or sgd, no cpu_offload); true: always (needs the first four); false: never. "
        "The start of the run logs which and why.",
        AUTO_BOOL,
    )
    dist_timeout_minutes: int = opt(
        60, "How long ranks wait for each other (e.g. while rank 0 tokenizes or writes the model)."
    )

    # Logging
    log_every: int = opt(1, "Print a progress line and write a metrics.jsonl record every N steps.")
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Trackers that also get the metrics: tensorboard, mlflow, wandb (a YAML list or a "
            "comma-separated string; docs/trainer.md says what each needs).",
            "choices": None,
        },
    )
    report_strict: bool = opt(
        False, "Stop the run when a report_to tracker cannot start (by default: one line, then without it)."
    )
    run_name: str = opt("", "The MLflow / W&B run name (empty: the tracker picks one).")
    experiment_name: str = opt(
        "",
        "The MLflow experiment / W&B project (empty: MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT, else Default).",
    )
    disk_log_dir: str = opt(
        "",
        "Also write torchtune's DiskLogger file here: log_<unix time>.txt, a `Step N | loss:... lr:... ` "
        "line per logged step (tune run's metric_logger DiskLogger sets it; empty: none).",
    )
    tensorboard_dir: str = opt("", "Where TensorBoard's event files go (empty: output_dir/tensorboard).")
    mlflow_register_as: str = opt(
        "", "Register the adapter (or the full model) as a new version of this MLflow registered model."
    )
    status_interval: float = opt(
        5.0,
        "Seconds between progress updates to the TrainJob status (Kubeflow Trainer's status server, when "
        "the controller injects KUBEFLOW_TRAINER_SERVER_URL); 5 is the Kubeflow SDK's minimum.",
    )

    def validate(self) -> TrainConfig:
        """Refuse values that cannot work, with the reason and the fix."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(choices)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        positive = ("lora_rank", "lora_alpha", "global_batch_size", "micro_batch_size", "max_seq_length")
        positive += ("log_every", "dist_timeout_minutes", "keep_last", "loss_chunk_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("max_steps", "num_epochs", "max_steps_per_epoch", "warmup_steps", "eval_every")
        non_negative += ("shard_group_size",)
        for name in (*non_negative, "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.num_epochs == 0:
            raise ConfigError("set max_steps or num_epochs to a positive number")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: name modules or use 'all-linear'")
        split_spec(self.dataset_split)
        for i, entry in enumerate(self.more_datasets):
            try:  # each dataset as if it were the only one
                dataclasses.replace(self, **entry, more_datasets=[]).validate()
            except ConfigError as exc:
                raise ConfigError(f"more_datasets[{i}]: {exc}") from None
        if self.val_dataset_split:
            split_spec(self.val_dataset_split)
            if self.val_fraction:
                raise ConfigError("give val_fraction or val_dataset_split, not both")
        elif self.val_dataset_dir:
            raise ConfigError("val_dataset_dir needs val_dataset_split (e.g. train or validation)")
        if self.use_dora and self.method == "full":
            raise ConfigError("use_dora applies to lora and qlora only; method full trains every weight")
        self._validate_dpo()
        self._validate_optimizer()
        self._validate_reporting()
        if self.merge_adapter and self.method == "full":
            raise ConfigError(
                "merge_adapter applies to lora and qlora only; method full writes the model itself"
            )
        return self

    def _validate_optimizer(self) -> None:
        if self.optimizer_in_backward == "true" and self.nan_policy == "skip_step":
            raise ConfigError(
                "nan_policy: skip_step needs the optimizer to step after the backward; optimizer_in_backward "
                "steps during it (a NaN gradient is applied before it is seen): use nan_policy: stop"
            )
        if self.optimizer_in_backward == "true" and self.method != "full":
            raise ConfigError(
                "optimizer_in_backward applies to method full (an adapter's gradients are small): "
                "set it to false"
            )
        if self.optimizer_in_backward == "true" and self.max_grad_norm:
            raise ConfigError(
                "optimizer_in_backward steps each weight before the global gradient norm is known: "
                "set max_grad_norm: 0"
            )
        if self.cpu_offload and self.method == "qlora":
            raise ConfigError("cpu_offload applies to sharded weights; a qlora 4-bit base is not sharded")

    def _validate_reporting(self) -> None:
        trackers = ("tensorboard", "mlflow", "wandb")
        unknown = [t for t in self.report_to if t not in trackers]
        if unknown:
            raise ConfigError(f"report_to: {', '.join(unknown)} is not one of {', '.join(trackers)}")
        self.report_to = list(dict.fromkeys(self.report_to))
        if self.mlflow_register_as and "mlflow" not in self.report_to:
            raise ConfigError("mlflow_register_as needs mlflow in report_to")
        if not self.status_interval > 0:
            raise ConfigError(f"status_interval must be > 0 seconds, got {self.status_interval}")

    def _validate_dpo(self) -> None:
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if not 0.0 <= self.dpo_label_smoothing < 0.5:
            raise ConfigError(f"dpo_label_smoothing must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.dpo_label_smoothing and self.dpo_loss != "sigmoid":
            raise ConfigError("dpo_label_smoothing applies to dpo_loss: sigmoid only; set it to 0 for ipo")
        if self.reference_model_dir and (self.objective != "dpo" or self.method != "full"):
            raise ConfigError(
                "reference_model_dir applies to objective dpo with method full (LoRA's reference is the base "
                "model with the adapter off)"
            )
        if self.message_format == "plain" and self.prompt_template in ("llama2_chat", "mistral_chat"):
            raise ConfigError(
                f"prompt_template {self.prompt_template} applies to a message_format other than plain (the "
                "model's chat template has its own words): set message_format, or prompt_template to ''"
            )
        if self.objective != "dpo":
            return
        if self.prompt_template and self.message_format == "plain":
            raise ConfigError(
                f"prompt_template {self.prompt_template} applies to objective dpo with a message_format "
                "other than plain (plain pairs are rendered with the model's chat template): set one, or ''"
            )
        for name, why in (
            ("packing", "a preference pair is a chosen and a rejected sequence, never packed"),
            ("train_on_prompt", "only response tokens count in DPO's log-probabilities"),
        ):
            if getattr(self, name):
                raise ConfigError(f"{name} applies to objective sft only ({why}): set it to false")
        if self.dataset_format != "auto":
            raise ConfigError(
                f"dataset_format {self.dataset_format} applies to objective sft; objective dpo reads "
                "prompt/chosen/rejected rows (leave dataset_format: auto)"
            )

    def system_message(self) -> str | None:
        """The system message every chat sample starts with: system_prompt, '' with empty_system_prompt,
        else None (none)."""
        return self.system_prompt if self.system_prompt or self.empty_system_prompt else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def grad_accumulation(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step (batching.BatchPlan and the optimizer's choice)."""
    return global_batch_size // max(micro_batch_size * world_size, 1)


def resolve_in_backward(cfg: TrainConfig, world_size: int) -> tuple[bool, str]:
    """Whether the run steps the optimizer in the backward (optim.InBackward), and why, for the start-of-run
    log line. The recipe, the planner and that line all ask here.

    auto chooses it exactly where the updates are the same as stepping after the backward: every weight's
    whole gradient is known when its hook fires (one micro-batch per step), nothing needs the global norm
    first (no clipping) or must see a gradient before it is applied (nan_policy stop: the step is refused
    afterwards, nothing of it is saved), and the optimizer's per-parameter steps equal its step over the
    list. Under cpu_offload FSDP copies a gradient to the host synchronously when a hook reads it, so auto
    keeps the overlapped copy there.
    """
    if cfg.optimizer_in_backward != "auto":
        return cfg.optimizer_in_backward == "true", f"optimizer_in_backward: {cfg.optimizer_in_backward}"
    accum = grad_accumulation(cfg.global_batch_size, cfg.micro_batch_size, world_size)
    blockers = [
        why
        for blocks, why in (
            (cfg.method != "full", f"method {cfg.method}"),
            (accum != 1, f"gradient accumulation {accum}"),
            (cfg.max_grad_norm > 0, f"max_grad_norm {cfg.max_grad_norm:g}"),
            (cfg.nan_policy != "stop", f"nan_policy {cfg.nan_policy}"),
            (cfg.optimizer not in IN_BACKWARD_EXACT, f"optimizer {cfg.optimizer}"),
            (cfg.cpu_offload, "cpu_offload"),
        )
        if blocks
    ]
    if blockers:
        return False, f"optimizer_in_backward: auto, not with {', '.join(blockers)}"
    return True, (
        "optimizer_in_backward: auto: method full, one micro-batch per step, no clipping, nan_policy stop: "
        "the same updates as after it"
    )


def field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _unknown(key: str) -> ConfigError:
    names = list(field_types())
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(names)}")


# The keys of one entry of more_datasets.
DATASET_KEYS = ("dataset_dir", "dataset_split", "dataset_source", "dataset_format", "column_map",
                "system_prompt", "empty_system_prompt", "train_on_prompt", "add_eos",
                "alpaca_preamble")  # fmt: skip


def dataset_list(key: str, value: Any) -> list[dict[str, Any]]:
    """more_datasets: a list of mappings of DATASET_KEYS (YAML, or the same as a JSON/YAML string)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else []
        except yaml.YAMLError:
            value = None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(
            f"{key}: expected a list of mappings like [{{dataset_dir: /data/b}}], got {value!r}"
        )
    out = []
    for i, entry in enumerate(value):
        unknown = sorted(set(map(str, entry)) - set(DATASET_KEYS))
        if unknown:
            raise ConfigError(f"{key}[{i}]: {unknown[0]} is not one of {', '.join(DATASET_KEYS)}")
        out.append({k: coerce(k, v) for k, v in entry.items()})
    return out


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type (values.py), or refuse it."""
    kind = field_types()[key]
    if key == "more_datasets":
        return dataset_list(key, value)
    if typing.get_origin(kind) is dict:
        parse = values.mapping
    elif _choices(key) == AUTO_BOOL:
        parse = values.auto_boolean
    elif isinstance(kind, types.GenericAlias) or typing.get_origin(kind) is list:
        parse = values.names
    else:
        parse = {bool: values.boolean, int: values.integer, float: values.number}.get(kind, _text)
    try:
        return parse(value)
    except values.BadValue as why:
        raise ConfigError(f"{key}: expected {why}, got {value!r}") from None


def _choices(key: str) -> tuple[str, ...] | None:
    return next(f.metadata.get("choices") for f in dataclasses.fields(TrainConfig) if f.name == key)


def _text(value: Any) -> str:
    if isinstance(value, bool | int | float | str):
        return str(value)
    raise values.BadValue("a string")


SPLIT = re.compile(r"^(?P<name>[A-Za-z_][\w.-]*)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def split_spec(spec: str) -> tuple[str, str | None]:
    """(split name, the slice in brackets or None) of `train`, `train[:10%]`, `validation[100:200]`."""
    match = SPLIT.match(spec.strip())
    if not match:
        raise ConfigError(
            f"dataset_split: {spec!r} is not a split name with an optional [start:stop] slice "
            "(e.g. train, train[:10%], train[100:500])"
        )
    has_slice = "[" in spec
    return match.group("name"), spec[spec.index("[") :] if has_slice else None


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """Split `--config FILE` and `--key value` / `--key=value` pairs; a bare `--flag` means true."""
    config_file, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(usage())
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: use --key value (see --help)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                switch = key in field_types() and (field_types()[key] is bool or _choices(key) == AUTO_BOOL)
                if key == "config" or not switch:
                    raise ConfigError(f"--{key} needs a value")
                value = "true"
            else:
                value, i = nxt, i + 1
        if key == "config":
            config_file = value
        elif key not in field_types():
            raise _unknown(key)
        else:
            overrides[key] = value
        i += 1
    return config_file, overrides


def load_yaml(path: str) -> dict[str, Any]:
    try:
        return values.yaml_file(path)
    except values.BadValue as why:
        raise ConfigError(f"config file {path} {why}") from None


def load_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the YAML file, then the command line; validated."""
    config_file, overrides = parse_cli(argv)
    values: dict[str, Any] = {}
    for source in (load_yaml(config_file) if config_file else {}, overrides):
        for key, value in source.items():
            key = str(key).replace("-", "_")
            if key not in field_types():
                raise _unknown(key)
            values[key] = coerce(key, value)
    return TrainConfig(**values).validate()


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def usage() -> str:
    lines = ["usage: torchrun -m pkg.trainer [--config FILE.yaml] [--key value ...]", "", "keys:"]
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"  --{f.name}{extra} (default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)
