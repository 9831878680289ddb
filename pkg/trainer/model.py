"""Tokenizer and model from `model_dir`: LoRA (peft), QLoRA (4-bit base, CUDA) or all weights trainable.

What an architecture needs is decided here, from the model itself rather than from a list of names:
- whether transformers can build it as a causal LM at all (`check_architecture`, one clear line if not);
- what `all-linear` adapts (`lora_targets`): every linear layer but the output head and, on a
  mixture-of-experts model, the fused expert stacks and the routers through peft's parameter targeting;
- the router's load-balancing loss of an MoE model (`router_aux_coef`), which the recipe adds to its loss.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from pkg.trainer import fused_lora
from pkg.trainer.config import TrainConfig
from pkg.trainer.distributed import state_tensors
from pkg.trainer.errors import TrainerError
from pkg.trainer.export import saved_names
from pkg.trainer.safetensors_stream import StreamReader

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


def check_architecture(model_dir: str) -> str:
    """The model type of `model_dir` if transformers builds it as a causal LM; one clear line otherwise.

    Code shipped with a model (config.json `auto_map`) is never run: only architectures built into
    transformers are trained.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = check_model_dir(model_dir)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TrainerError(f"model_dir {root}: config.json is not valid JSON: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    names = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
    if model_type not in CONFIG_MAPPING_NAMES:
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            files = sorted({f"{ref.split('--')[-1].rsplit('.', 1)[0]}.py" for ref in _refs(auto_map)})
            missing = [f for f in files if not (root / f).exists()]
            where = f"{', '.join(missing)} not in {root}" if missing else f"{', '.join(files)} in {root}"
            raise TrainerError(
                f"model_dir {root}: model type {model_type!r} ({names or 'no architectures'}) is not built "
                f"into transformers {transformers.__version__}; it needs its own code ({where}), which the "
                "llm-trainer does not run: use a model whose architecture transformers includes"
            )
        raise TrainerError(
            f"model_dir {root}: config.json names model type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know: upgrade transformers or use a supported model"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TrainerError(
            f"model_dir {root}: a {model_type} model ({names or 'no architectures'}) has no causal language-"
            "model head in transformers: the llm-trainer fine-tunes decoder language models "
            "(AutoModelForCausalLM)"
        )
    return model_type


def _refs(auto_map: dict) -> list[str]:
    """The 'module.Class' references of a config.json `auto_map` (values may be lists for tokenizers)."""
    refs = []
    for value in auto_map.values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return refs


# Files one of which every Hugging Face tokenizer has (fast, SentencePiece, BPE, WordPiece vocabularies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tiktoken.model",
)


def check_tokenizer_files(model_dir: str) -> None:
    """One line when model_dir has no tokenizer (transformers would advise installing sentencepiece)."""
    root = Path(model_dir)
    if not any((root / name).exists() for name in TOKENIZER_FILES) and not any(root.glob("*.tiktoken")):
        raise TrainerError(
            f"model_dir {root} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): download the "
            "tokenizer with the model (the model initializer fetches the whole repository)"
        )


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    check_architecture(model_dir)  # before any tokenizing: a model that cannot train stops the run here
    check_tokenizer_files(model_dir)
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


def load_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model with the trainable parameters `cfg.method` asks for, on CPU (FSDP moves the shards).

    At world size > 1 every rank builds it on the meta device instead (load_model_on_meta).
    """
    check_architecture(cfg.model_dir)
    return _finish(_read_pretrained(cfg, device), cfg)


def _finish(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        return model
    return add_lora(model, cfg)


def load_model_on_meta(
    cfg: TrainConfig, plan: bool
) -> tuple[nn.Module, dict[str, str | torch.Tensor] | str | None]:
    """The model of `load_model` with its parameters on the meta device, and (with `plan`) their sources.

    No weight is read and no host memory is spent on parameters; buffers are computed as usual (rotary
    frequencies: small). At world size > 1 every rank builds this, shards it, and rank 0 then streams the
    weights into the shards (distributed.shard_streamed) from `sources`: {name: checkpoint key, or the initial
    value of a tensor the checkpoint lacks (LoRA's, drawn from the same random stream as on a loaded
    model)} for every parameter and persistent buffer (distributed.state_tensors). Instead of sources, a
    reason when the checkpoint does not hold the model's tensors one for one under the model's own names
    (transformers converts them on load: fused MoE experts, renamed keys) or an adapter's initial value
    depends on the base weights (DoRA): then rank 0 reads the model with `load_model`.
    """
    check_architecture(cfg.model_dir)
    base = _build_on_meta(cfg)
    keys = _checkpoint_keys(base, cfg.model_dir) if plan else None
    with _initial_values() as initial:
        net = _finish(base, cfg)
    if not isinstance(keys, dict):
        return net, keys
    sources: dict[str, str | torch.Tensor] = {}
    for name, tensor in state_tensors(net):
        source = keys.get(id(tensor), initial.get(id(tensor)))
        if source is None:
            return net, f"{name} is neither in the checkpoint nor initialised without the base weights"
        sources[name] = source
    return net, sources


def _checkpoint_keys(base: nn.Module, model_dir: str) -> dict[int, str] | str:
    """{id(tensor): checkpoint key} of the base model's weights when the checkpoint holds them one for one,
    with the shapes of the model; otherwise the reason why not."""

    try:
        reader = StreamReader(Path(model_dir))
    except (OSError, ValueError) as exc:
        raise TrainerError(f"cannot load the model from {model_dir}: {exc}") from None
    names = saved_names(base)  # the names save_pretrained writes (tied copies once), None if it converts them
    if names is None:
        return f"transformers converts {type(base).__name__}'s weights on load"
    if set(names) != set(reader.entries):
        odd = sorted(set(names) ^ set(reader.entries))
        return f"its checkpoint's tensor names differ from the model's (e.g. {', '.join(odd[:3])})"
    state = base.state_dict(keep_vars=True)
    keys = {}
    for name in names:
        if list(state[name].shape) != reader.entries[name][2]["shape"]:
            return f"{name} has shape {reader.entries[name][2]['shape']} in the checkpoint"
        keys[id(state[name])] = name
    return keys


@contextlib.contextmanager
def _initial_values() -> Iterator[dict[int, torch.Tensor]]:
    """{id(tensor): value} of the tensors moved from a real device to the meta device inside the block.

    peft creates and initialises the LoRA matrices on the CPU, drawing from the random stream as it would
    on a loaded model, then moves them to the device of their base layer: meta here. Their values are kept
    on the way (swapping the moved tensors in place keeps the parameter objects, hence the ids).
    """
    values: dict[int, torch.Tensor] = {}

    class Keep(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            moved = func is torch.Tensor.to and isinstance(out, torch.Tensor) and out.is_meta
            if moved and not args[0].is_meta:
                values[id(args[0])] = args[0].detach().clone()
            return out

    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with Keep():
            yield values
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def _read_pretrained(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """`from_pretrained` in fp32 (or a 4-bit NF4 base for QLoRA: bf16 compute on the GPU, fp32 on the CPU,
    where bitsandbytes >= 0.49 has 4-bit kernels too)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if cfg.method == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainerError(
                "method qlora needs bitsandbytes (pkg/trainer/requirements-gpu.txt, in the CUDA llm-trainer "
                "image): pip install bitsandbytes, or use method lora"
            )
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        kwargs = {
            "dtype": compute,
            "device_map": {"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
        }
    try:
        # Mismatched shapes are reported here, in one line, rather than in transformers' own table.
        model, info = AutoModelForCausalLM.from_pretrained(
            cfg.model_dir, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except Exception as exc:
        raise TrainerError(
            f"cannot load the model from {cfg.model_dir}: {type(exc).__name__}: {exc}"
        ) from None
    check_loading_info(cfg.model_dir, info)
    return model


def check_loading_info(model_dir: str, info: dict) -> None:
    """Refuse a checkpoint that lacks a weight of the model or holds one of another shape.

    transformers initializes such weights at random and goes on, which would train (and export) a model
    part of which is noise. Tied copies and non-persistent buffers are not "missing": transformers leaves
    them out of `missing_keys` itself.
    """
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        name, saved, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise TrainerError(
            f"model_dir {model_dir}: weight {name} has shape {list(saved)} in the checkpoint but "
            f"{list(wanted)} in config.json{more}: the config and the weights are of different models; "
            "download both from the same model revision"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TrainerError(
            f"model_dir {model_dir}: the checkpoint has no weight {missing[0]}{more}, which the model needs "
            "(it would start from random values): the download is incomplete or of another model; "
            "download the model again"
        )


def _build_on_meta(cfg: TrainConfig) -> nn.Module:
    """The fp32 architecture from config.json with its parameters on the meta device (filled in after
    sharding) and its buffers computed on the CPU.

    Each parameter is moved to meta as it is registered, before its module initialises it, so no weight is
    initialised (nor the random stream drawn from, as on the meta device).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    hook = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        config = AutoConfig.from_pretrained(cfg.model_dir)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise TrainerError(
            f"cannot build the model of {cfg.model_dir}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        hook.remove()


def check_vocabulary(model: nn.Module, tokenizer, model_dir: str) -> None:
    """Refuse a tokenizer whose ids reach past the model's input embedding.

    Such ids would index no row: at one process an IndexError deep in the forward, and with the embedding
    split by vocabulary rows across ranks (vocab_parallel) no rank looks them up and they embed as zeros,
    silently. Checked on the model as built (meta or real), before sharding, so at every world size.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise TrainerError(
            f"model_dir {model_dir}: the tokenizer has {len(tokenizer)} tokens, the model's embedding only "
            f"{rows} rows (config.json vocab_size): ids >= {rows} have no embedding; use the tokenizer that "
            "came with these weights (or resize the model's embeddings before fine-tuning)"
        )


def expert_parameters(model: nn.Module) -> list[str]:
    """Names of the fused expert stacks of an MoE model: 3-D weights, one [out, in] matrix per expert."""
    return [name for name, p in model.named_parameters() if p.ndim == 3]


def router_parameters(model: nn.Module) -> list[str]:
    """Names of the router weights that are plain parameters of a router module (not an `nn.Linear`)."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if "router" in type(module).__name__.lower()
        and not isinstance(module, nn.Linear)
        and isinstance(getattr(module, "weight", None), nn.Parameter)
    ]


def _linear_names(model: nn.Module) -> set[str]:
    """Leaf names of every linear layer but the output head (what peft's `all-linear` means)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head
    }


def _suffix(name: str) -> str:
    """`model.layers.0.mlp.experts.down_proj` -> `experts.down_proj`: the owner and the parameter."""
    return ".".join(name.split(".")[-2:])


def lora_targets(model: nn.Module, requested: list[str]) -> tuple[list[str], list[str]]:
    """(module names, parameter names) for peft: `all-linear` resolved, expert parameters told apart.

    On a mixture-of-experts model `all-linear` is every linear layer but the head plus the fused expert
    stacks and the routers, which are parameters rather than `nn.Linear` modules in transformers 5 (peft
    adapts them with `target_parameters`, one rank-r update per expert). A requested name that is the end
    of a parameter's name rather than a module's (`experts.gate_up_proj`, `gate.weight`) is a parameter
    target; anything else is a module name.
    """
    params = [name for name, _ in model.named_parameters()]
    if requested == ["all-linear"]:
        modules = sorted(_linear_names(model))
        parameters = sorted({_suffix(n) for n in expert_parameters(model) + router_parameters(model)})
        return modules, parameters
    module_names = {name for name, _ in model.named_modules()}
    modules, parameters = [], []
    for target in requested:
        is_module = any(n == target or n.endswith(f".{target}") for n in module_names)
        is_param = any(n == target or n.endswith(f".{target}") for n in params)
        (parameters if is_param and not is_module else modules).append(target)
    return modules, parameters


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.activation_checkpointing
        )
    targets = cfg.lora_target_modules
    modules, parameters = lora_targets(model, targets)
    if parameters and cfg.use_dora:  # peft's DoRA applies to layers only, not to parameters
        if targets != ["all-linear"]:
            raise TrainerError(
                f"lora_target_modules {targets}: {', '.join(parameters)} are parameters (MoE experts or "
                "routers), which peft cannot adapt with DoRA: leave them out or set use_dora: false"
            )
        log.info("use_dora: the experts and routers stay frozen (DoRA applies to linear layers only)")
        parameters = []
    if parameters:
        log.info(
            "mixture-of-experts: LoRA on the linear layers %s and on the parameters %s (each expert gets its "
            "own rank-%d update); lora_dropout applies to the linear layers only, since peft cannot drop out "
            "inside a fused expert stack",
            ", ".join(modules) or "(none)", ", ".join(parameters), cfg.lora_rank,
        )  # fmt: skip
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        # peft refuses dropout on parameter targets: it is installed on the linear layers afterwards.
        lora_dropout=0.0 if parameters else cfg.lora_dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except (ValueError, RuntimeError) as exc:
        raise TrainerError(f"lora_target_modules {targets}: {exc}") from None
    if parameters and cfg.lora_dropout:
        _linear_dropout(model, cfg.lora_dropout)
    _report_remapped(model, modules)
    fused_lora.install(model)
    return model


def _report_remapped(model: nn.Module, modules: list[str]) -> None:
    """Say which requested module names got no adapter.

    For MoE families whose experts were linear layers in transformers 4 (Qwen-MoE, DeepSeek, GLM-MoE, ...),
    peft reads `gate_proj`, `up_proj`, `down_proj` (or `w1`, `w2`, `w3`) as the experts, so linear layers
    of those names (shared experts, dense layers) stay frozen; an adapter that adapted them could not be
    loaded back faithfully by peft anyway.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    frozen = sorted(set(modules) - adapted)
    if frozen:
        log.warning(
            "peft reads %s as this architecture's expert weights (its transformers 4 names): the linear "
            "layers of those names (shared experts, dense layers) get no adapter",
            ", ".join(frozen),
        )


def _linear_dropout(model: nn.Module, p: float) -> None:
    """Dropout on the input of every LoRA linear layer (those peft built without it; see add_lora)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            for name in module.lora_dropout:
                module.lora_dropout[name] = nn.Dropout(p)


def router_aux_coef(model: nn.Module) -> float:
    """The weight of an MoE model's router load-balancing loss in its own training loss; 0 for others.

    transformers computes that loss only when asked (`output_router_logits`, off in most config.json files
    because inference does not need it) and adds `router_aux_loss_coef` times it when given labels. The
    recipe asks for it in every training forward and adds it with that coefficient, as the model was
    pre-trained; `router_aux_loss_coef: 0` in config.json turns it off.
    """
    config = getattr(model, "config", None)
    if not hasattr(config, "output_router_logits"):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; call before sharding."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
