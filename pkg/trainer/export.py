"""Final outputs in Hugging Face formats, gathered from every shard and written atomically.

- LoRA/QLoRA: output_dir/adapter/ (adapter_config.json + adapter_model.safetensors, loadable with peft), and
  with `merge_adapter` output_dir/model/ (base + adapter merged, with the tokenizer, for transformers alone).
- Full: output_dir/model/ (config, safetensors weights, tokenizer).

The weights are gathered with `get_model_state_dict(full_state_dict=True, cpu_offload=True)`, a collective
every rank joins, so the adapter is complete rather than rank 0's slice. Each folder is written under a
temporary name and renamed into place, so a crash never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pkg.trainer import distributed
from pkg.trainer.config import TrainConfig


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gather_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU; empty on other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def save_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter_model.safetensors"))
        model.peft_config["default"].save_pretrained(str(tmp))


def _save_with_tokenizer(model: nn.Module, model_dir: str, out: Path) -> None:
    from transformers import AutoTokenizer

    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(tmp))


def _original_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def save_merged(model_dir: str, adapter_dir: Path, out: Path) -> None:
    """Base model + adapter merged in fp32, saved in the base model's dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dtype = _original_dtype(base.config)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    _save_with_tokenizer(merged.to(dtype), model_dir, out)


def save_full(model_dir: str, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Trained weights in a fresh (meta-initialized) copy of the architecture, saved in the original dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    dtype = _original_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"trained state dict lacks {missing[:5]}")
    _save_with_tokenizer(model, model_dir, out)


def export(model: nn.Module, cfg: TrainConfig, is_main: bool) -> list[Path]:
    """Write the final outputs; every rank calls this (the gather is collective). Returns rank 0's paths."""
    out = Path(cfg.output_dir)
    written: list[Path] = []
    lora = cfg.method != "full"
    state_dict = gather_state_dict(model, trainable_only=lora)
    if is_main:
        if lora:
            save_adapter(model, state_dict, out / "adapter")
            written.append(out / "adapter")
            if cfg.merge_adapter:
                save_merged(cfg.model_dir, out / "adapter", out / "model")
                written.append(out / "model")
        else:
            save_full(cfg.model_dir, state_dict, out / "model")
            written.append(out / "model")
    del state_dict
    distributed.barrier()
    return written
