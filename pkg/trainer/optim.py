"""The optimizer (`optimizer`) and stepping it inside the backward pass (`optimizer_in_backward`).

- adamw: torch's AdamW, fused (one kernel over all parameters, on CUDA and CPU alike).
- adamw_8bit, paged_adamw_8bit: bitsandbytes' blockwise 8-bit AdamW (its paged variant moves state to
  host memory under GPU memory pressure): a quarter of AdamW's 8 bytes per trainable weight. bitsandbytes
  steps plain CUDA tensors, so they need one CUDA GPU and unsharded parameters (one process, or QLoRA).
- sgd: plain SGD (momentum 0): no state at all.

`optimizer_in_backward` (full fine-tuning; by default wherever it gives the same updates, which
config.resolve_in_backward decides): one optimizer per parameter, stepped by a post-accumulate-grad hook the
moment the backward has that parameter's whole (reduced, sharded) gradient, which is then freed, so the
model's gradients never exist all at once. FSDP2 calls these hooks after its reduce-scatter. The
per-parameter optimizers share their param_group dicts with one `InBackward` front, so the learning-rate
scheduler, checkpoints (DCP takes the list) and the recipe handle it as one optimizer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from pkg.trainer import vocab_parallel
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import TrainerError

BETAS = (0.9, 0.999)


def _factory(cfg: TrainConfig, device: torch.device, sharded: bool):
    """(optimizer class, extra keyword arguments) for `cfg.optimizer`, or a one-line refusal."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW, {"betas": BETAS, "fused": True}
    if device.type != "cuda":
        raise TrainerError(
            f"optimizer {cfg.optimizer} is bitsandbytes' 8-bit AdamW and runs on a CUDA GPU only; "
            "use optimizer: adamw here"
        )
    if sharded:
        raise TrainerError(
            f"optimizer {cfg.optimizer} (bitsandbytes) cannot step FSDP's sharded parameters: run one "
            "process, or use optimizer: adamw (with cpu_offload to keep its state in host memory)"
        )
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls, {"betas": BETAS}


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Matrices decay, biases and norms do not (unless `decay_all`: torchtune's AdamW over everything)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decays = [p.ndim >= 2 or decay_all for p in trainable]
    return [
        {"params": [p for p, d in zip(trainable, decays, strict=True) if d], "weight_decay": weight_decay},
        {"params": [p for p, d in zip(trainable, decays, strict=True) if not d], "weight_decay": 0.0},
    ]


def build(
    model: nn.Module, cfg: TrainConfig, device: torch.device, sharded: bool, in_backward: bool
) -> torch.optim.Optimizer:
    """`cfg.optimizer` over the model's trainable weights; `in_backward` (config.resolve_in_backward): one per
    parameter, stepped in the backward."""
    cls, extra = _factory(cfg, device, sharded)
    groups = param_groups(model, cfg.weight_decay, cfg.decay_all_parameters)
    if in_backward:
        split = {id(p) for p in vocab_parallel.split_parameters(model)}
        return InBackward(groups, lambda g: cls(g, lr=cfg.learning_rate, **extra), split)
    return cls(groups, lr=cfg.learning_rate, **extra)


def parts(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that hold state: the per-parameter ones of InBackward, or the optimizer itself."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


class InBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped and its gradient freed from the parameter's
    post-accumulate-grad hook. `step()` only ends the step (the updates happened in the backward);
    `grad_norm()` is the global norm of the gradients it consumed."""

    def __init__(self, groups: list[dict], make, replicated: set[int] = frozenset()) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self._replicated = replicated  # ids of vocabulary-split parameters: averaged over replicas first
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.optimizers.append(make([{"params": [p], **options}]))
                p.register_post_accumulate_grad_hook(self._hook(self.optimizers[-1]))
        # Not Optimizer.__init__: the parameters already belong to the optimizers above.
        self.defaults = self.optimizers[0].defaults if self.optimizers else {}
        self.state = {}
        self._square_sum = 0.0

    @property
    def param_groups(self) -> list[dict]:
        """The optimizers' own param_group dicts, read anew each time: the scheduler sets their lr, and
        loading a checkpoint (Optimizer.load_state_dict) replaces them."""
        return [g for o in self.optimizers for g in o.param_groups]

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step(p: torch.Tensor) -> None:
            if id(p) in self._replicated:
                vocab_parallel.reduce_replica_grad(p)
            self._square_sum += _local_square(p.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def step(self, closure=None) -> None:  # the updates happened in the backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def grad_norm(self, device: torch.device) -> float:
        """The global gradient norm of the step just taken (summed over ranks), then reset."""
        total = torch.tensor([self._square_sum], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        self._square_sum = 0.0
        return math.sqrt(float(total))

    def clear_state(self) -> None:
        for o in self.optimizers:
            o.state.clear()


def _local_square(grad: torch.Tensor) -> float:
    """This rank's share of the squared gradient norm: a replicated part counts once over its replicas."""
    if hasattr(grad, "to_local"):
        local = grad.to_local()
        replicas = grad.device_mesh.size(0) if grad.device_mesh.ndim > 1 else 1
        return _square(local) / replicas
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _square(grad) / world  # unsharded: every rank holds the same gradient


def _square(t: torch.Tensor) -> float:
    """Sum of squares in fp32 without a temporary of t's size (grad.pow(2) was one: 311 MB for a
    151,936 x 512 head, which set optimizer_in_backward's peak)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float32)) ** 2
