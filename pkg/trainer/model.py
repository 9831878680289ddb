"""Tokenizer and model from `model_dir`: LoRA (peft), QLoRA (4-bit base, CUDA) or all weights trainable."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pkg.trainer import fused_lora
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError

log = logging.getLogger(__name__)


def check_model_dir(model_dir: str) -> Path:
    root = Path(model_dir)
    if not root.is_dir():
        raise TrainerError(f"model_dir {root} does not exist: run the model initializer or set model_dir")
    if not (root / "config.json").exists():
        raise TrainerError(f"model_dir {root} has no config.json: it must hold a Hugging Face model")
    if not any(root.glob("*.safetensors")):
        raise TrainerError(f"model_dir {root} has no *.safetensors weights (only safetensors are loaded)")
    return root


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    check_model_dir(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise TrainerError(
            f"cannot load the tokenizer from {model_dir}: {type(exc).__name__}: {exc}"
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out of the loss and attention, so any existing token is a safe pad.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise TrainerError(f"the tokenizer in {model_dir} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
        log.info("tokenizer has no pad token: padding with %r", fallback)
    return tokenizer


def load_model(cfg: TrainConfig, device: torch.device, weights: bool = True) -> nn.Module:
    """The model with the trainable parameters `cfg.method` asks for, on CPU (FSDP moves the shards).

    With `weights=False` the same architecture (and LoRA layers) is built on the meta device from
    config.json alone: no weights are read and no host memory is spent. Ranks other than 0 do that at
    world size > 1 and receive rank 0's weights after sharding (distributed.shard_from_rank0), so a node
    holds one full copy of the model in host memory instead of one per process.
    """
    check_model_dir(cfg.model_dir)
    model = _read_pretrained(cfg, device) if weights else _build_on_meta(cfg)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        return model
    return add_lora(model, cfg)


def _read_pretrained(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """`from_pretrained` in fp32 (or 4-bit NF4 on the GPU for QLoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if cfg.method == "qlora":
        if device.type != "cuda":
            raise TrainerError("method qlora needs a CUDA GPU (bitsandbytes 4-bit); use method lora on CPU")
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise TrainerError("method qlora needs bitsandbytes: pip install bitsandbytes") from None
        kwargs = {
            "dtype": torch.bfloat16,
            "device_map": {"": device.index or 0},
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        }
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model_dir, **kwargs)
    except Exception as exc:
        raise TrainerError(
            f"cannot load the model from {cfg.model_dir}: {type(exc).__name__}: {exc}"
        ) from None


def _build_on_meta(cfg: TrainConfig) -> nn.Module:
    """The fp32 architecture from config.json on the meta device: shapes only, filled in after sharding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(cfg.model_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise TrainerError(
            f"cannot build the model of {cfg.model_dir}: {type(exc).__name__}: {exc}"
        ) from None


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.activation_checkpointing
        )
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise TrainerError(f"lora_target_modules {targets}: {exc}") from None
    fused_lora.install(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; call before sharding."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
