"""Final outputs in Hugging Face formats, gathered from every shard and written atomically.

- LoRA/QLoRA: output_dir/adapter/ (adapter_config.json + adapter_model.safetensors, loadable with peft), and
  with `merge_adapter` output_dir/model/ (base + adapter merged, with the tokenizer, for transformers alone).
- Full: output_dir/model/ (config, safetensors weights, tokenizer).

The adapter is gathered with `get_model_state_dict(full_state_dict=True, cpu_offload=True)`, a collective
every rank joins, so it is complete rather than rank 0's slice. model/ is streamed one tensor at a time
(safetensors_stream.py): for full fine-tuning each weight is all-gathered from its shards, cast and written
before the next; a merged model reads each base weight from model_dir, adds its LoRA delta and writes it. So
writing model/ never holds a second copy of the whole model, on rank 0 or anywhere. The files are those of
`save_pretrained` (same names, shards and index, config.json, generation_config.json, the tokenizer); an
architecture whose weights save_pretrained would convert (some MoE layouts), or a LoRA layer other than a
linear one, falls back to building the whole model and calling `save_pretrained`.

Each folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written model that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from pkg.trainer import distributed
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError
from pkg.trainer.files import atomic_dir
from pkg.trainer.safetensors_stream import StreamReader, StreamWriter

log = logging.getLogger(__name__)


def remove_leftovers(output_dir: Path) -> None:
    """Delete the temporary folders of an export that was killed (full-size model copies); rank 0, under
    the output_dir lock, so no export is running."""
    for name in ("adapter", "model"):
        for left in [*output_dir.glob(f".{name}.tmp-*"), *output_dir.glob(f".trash-{name}-*")]:
            shutil.rmtree(left, ignore_errors=True)


def gather_state_dict(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU; empty on other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def save_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor], out: Path) -> dict[str, torch.Tensor]:
    """adapter/ as peft writes it; returns the adapter's tensors (peft's key names)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
    weights = {k: v.contiguous() for k, v in weights.items()}
    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / "adapter_model.safetensors"))
        model.peft_config["default"].save_pretrained(str(tmp))
    return weights


def _original_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def skeleton(model_dir: str) -> nn.Module:
    """The architecture of model_dir on the meta device (no memory): names, shapes, config to save."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def saved_names(meta: nn.Module) -> list[str] | None:
    """The weight names save_pretrained writes for this architecture (tied copies left out), or None when
    it would rename or convert them on the way (then only save_pretrained can write them)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = meta.state_dict()
    for key in getattr(meta, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, meta)
    try:
        converted = revert_weight_conversion(meta, dict(state))
    except Exception:  # a conversion that cannot run on meta tensors: not streamable
        return None
    # save_pretrained of a loaded model writes the names sorted (which decides how shards split).
    return sorted(state) if set(converted) == set(state) else None


def _save_configs(meta: nn.Module, folder: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them, without weights.

    Call it before writing the weights: save_pretrained removes weight files it did not write itself.
    """
    meta.save_pretrained(str(folder), state_dict={})


def _save_tokenizer(model_dir: str, folder: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(folder))


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def save_full(model: nn.Module, model_dir: str, out: Path, is_main: bool) -> None:
    """model/ from the trained (possibly sharded) model, one weight at a time. Every rank must call it."""
    meta = skeleton(model_dir)
    dtype = _original_dtype(meta.config)
    names = saved_names(meta)
    state = model.state_dict()  # this rank's shards: references, no copy
    if names is None or not set(names) <= set(state):
        log.info("%s: saving through save_pretrained (whole model in memory)", type(meta).__name__)
        _save_full_whole(meta, gather_state_dict(model, trainable_only=False), model_dir, out, is_main)
        return
    layout = {
        n: (dtype if state[n].is_floating_point() else state[n].dtype, tuple(state[n].shape)) for n in names
    }
    with atomic_dir(out) if is_main else contextlib.nullcontext() as tmp:
        writer = None
        if is_main:
            _save_configs(meta, tmp)
            writer = StreamWriter(tmp, layout, meta.num_parameters())
        for name in names:
            tensor = state[name]
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()  # all-gather of this one weight, on every rank
            if writer:
                writer.write(name, _cast(tensor, dtype))
            del tensor
        if writer:
            writer.close()
            _save_tokenizer(model_dir, tmp)


def _save_full_whole(meta: nn.Module, state_dict: dict, model_dir: str, out: Path, is_main: bool) -> None:
    if not is_main:
        return
    dtype = _original_dtype(meta.config)
    meta.load_state_dict({k: _cast(v, dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    meta.tie_weights()
    missing = [n for n, p in meta.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"trained state dict lacks {missing[:5]}")
    with atomic_dir(out) as tmp:
        meta.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(model_dir, tmp)


def lora_deltas(model: nn.Module, adapter: dict[str, torch.Tensor]) -> dict[str, tuple] | None:
    """{base weight name: (A, B, scaling)} of every LoRA layer.

    None if one is not a plain linear LoRA (embedding or conv LoRA, DoRA, a LoRA bias, fan_in_fan_out,
    several adapters): those merge through peft.
    """
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if (
            list(module.lora_A) != ["default"] or module.lora_variant or module.lora_embedding_A
            or getattr(module, "fan_in_fan_out", False) or module.lora_B["default"].bias is not None
        ):  # fmt: skip
            return None
        prefix = name
        a, b = adapter.get(f"{prefix}.lora_A.weight"), adapter.get(f"{prefix}.lora_B.weight")
        if a is None or b is None:
            return None
        deltas[prefix.removeprefix("base_model.model.") + ".weight"] = (
            a,
            b,
            float(module.scaling["default"]),
        )
    return deltas


def save_merged(model: nn.Module, adapter: dict[str, torch.Tensor], model_dir: str, out: Path) -> None:
    """Base weights + LoRA deltas merged in fp32 and saved in the base model's dtype, one weight at a time."""
    meta = skeleton(model_dir)
    dtype = _original_dtype(meta.config)
    names = saved_names(meta)
    deltas = lora_deltas(model, adapter)
    reader = StreamReader(Path(model_dir))
    source: dict[str, str] = {}  # {written name: the checkpoint's name} where they differ
    tied = tied_head(meta)
    if names is not None and deltas is not None and tied and tied[0] in deltas:
        # LoRA on a tied head changes the head, not the input embedding: the merged model unties them and
        # writes the head as the embedding plus the delta (merging into the shared matrix would move both).
        names = sorted([*names, tied[0]])
        source[tied[0]] = tied[1]
        meta.config.tie_word_embeddings = False
    if (
        names is None
        or deltas is None
        or not set(deltas) <= set(names)
        or not all(source.get(n, n) in reader for n in names)
    ):
        log.info("%s: merging through peft (whole model in memory)", type(meta).__name__)
        _save_merged_whole(model_dir, out.parent / "adapter", out)
        return
    meta.config.use_cache = True
    layout = {}
    for name in names:
        stored = reader.entries[source.get(name, name)][2]
        stored_dtype = reader.read_dtype(source.get(name, name))
        layout[name] = (dtype if stored_dtype.is_floating_point else stored_dtype, tuple(stored["shape"]))
    with atomic_dir(out) as tmp:
        _save_configs(meta, tmp)
        untied = meta.get_output_embeddings().weight.numel() if source else 0  # the head's own copy now
        writer = StreamWriter(tmp, layout, meta.num_parameters() + untied)
        for name in names:
            tensor = reader.read(source.get(name, name))
            if name in deltas:
                a, b, scaling = deltas[name]
                tensor = tensor.float().addmm_(b.float(), a.float(), alpha=scaling)
            writer.write(name, _cast(tensor, dtype))
            del tensor
        writer.close()
        _save_tokenizer(model_dir, tmp)


def tied_head(meta: nn.Module) -> tuple[str, str] | None:
    """(output head's weight name, input embedding's weight name) when the two are one tensor, else None."""
    head, embed = meta.get_output_embeddings(), meta.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return None
    names = {id(m): n for n, m in meta.named_modules()}
    return f"{names[id(head)]}.weight", f"{names[id(embed)]}.weight"


def _save_merged_whole(model_dir: str, adapter_dir: Path, out: Path) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tied = tied_head(base)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if tied and any(k.endswith(f"{tied[0].removesuffix('.weight')}.lora_A.weight") for k in keys):
        raise TrainerError(
            f"merge_adapter: {type(base).__name__} ties its output head to the input embedding and the "
            "adapter has LoRA on the head, which peft cannot merge exactly into this architecture (the "
            f"embedding would change too); adapter/ is written in {adapter_dir}: use it as it is, or leave "
            "lm_head out of lora_target_modules"
        )
    dtype = _original_dtype(base.config)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged = merged.to(dtype)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(model_dir, tmp)


def torchtune_layout(out: Path, written: list[Path], epoch: int) -> Path:
    """torchtune's `output_dir/epoch_{N}/` beside our folders: the adapter's files (peft format) and the
    model's (safetensors, config, tokenizer) as hard links to the same files, or relative symbolic links
    where the filesystem has no hard links. Nothing is copied."""
    final = out / f"epoch_{epoch}"
    with atomic_dir(final) as tmp:
        for folder in written:
            for path in sorted(folder.iterdir()):
                target = tmp / path.name
                if not path.is_file() or target.exists():
                    continue
                try:
                    os.link(path, target)
                except OSError:
                    os.symlink(os.path.relpath(path, final), target)
    return final


def export(model: nn.Module, cfg: TrainConfig, is_main: bool) -> list[Path]:
    """Write the final outputs; every rank calls this (the gathers are collective). Returns rank 0's paths."""
    out = Path(cfg.output_dir)
    written: list[Path] = []
    if cfg.method == "full":
        save_full(model, cfg.model_dir, out / "model", is_main)
        written.append(out / "model")
    else:
        state_dict = gather_state_dict(model, trainable_only=True)  # the adapter: small
        if is_main:
            adapter = save_adapter(model, state_dict, out / "adapter")
            written.append(out / "adapter")
            if cfg.merge_adapter:
                save_merged(model, adapter, cfg.model_dir, out / "model")
                written.append(out / "model")
        del state_dict
    distributed.barrier()
    return written
