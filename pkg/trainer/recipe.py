"""The fine-tuning recipe: setup, train, save.

    torchrun --nproc-per-node 2 -m pkg.trainer --model_dir M --dataset_dir D --output_dir O --max_steps 100
    python -m pkg.trainer --config job.yaml                     # one process (a group of one)

What it does, in the order of this file (`Recipe.run`):
1. setup: the process group; output_dir checked and locked (output_lock.py); a finished run is not trained
   again; the tokenized data (the objective's, cached); the batch plan; the model built for the method
   (LoRA / QLoRA / full), sharded with FSDP2 (`BuiltModel`); the objective (SFT or DPO, objective.py); the
   optimizer and the learning-rate schedule; resume from the newest checkpoint; metrics and trackers.
2. train: one optimizer step per global batch (`train_step`): each micro-batch's loss from the objective,
   normalised over the whole global batch, backward, gradients reduced and clipped, the step; `nan_policy`;
   progress, validation every `eval_every` steps, a checkpoint every `save_every`; SIGTERM checkpoints at
   the step boundary and exits 143 (resilience.py).
3. save: the optimizer state freed, the weights checked finite, the outputs exported (adapter/ or model/,
   export.py), summary.json and loss.png (metrics.py).

Features and their flags (pkg/trainer/config.py documents every key):
- Methods: LoRA through peft on all linear layers or `lora_target_modules` (`method: lora`, `lora_rank`,
  `lora_alpha`, `lora_dropout`; one fused forward/backward per LoRA linear, fused_lora.py), QLoRA on a
  4-bit base (`method: qlora`; bitsandbytes on CUDA or the CPU), all weights (`method: full`). What differs
  between them in the loop (gradient sync, reduction) is decided when the model is built (`BuiltModel`).
- FSDP2: `fully_shard` per decoder layer and the root; gloo on CPU, NCCL on CUDA; bf16 compute with fp32
  master weights and gradient reduction on GPU (`precision`); `activation_checkpointing`.
- Batches: `global_batch_size` samples per optimizer step whatever the world size, `micro_batch_size` per
  forward; the samples of step k are a pure function of (seed, k) (batching.BatchPlan).
- Objectives (objective.py): SFT (sft.py), the token-weighted mean cross-entropy over the global batch; DPO
  (`objective: dpo`, dpo.py and preference.py), the mean over the global batch's pairs. Each rank sums its
  micro-batches' losses and divides by the all-reduced count, so 1 and N processes give the same loss and
  gradients.
- Data: formats, prompt masking (`train_on_prompt`), `packing`, `max_seq_length`, a tokenized cache (data.py).
- Schedule: `max_steps` or `num_epochs`, AdamW (`learning_rate`, `weight_decay`), `warmup_steps` then
  `lr_scheduler` (cosine, linear, constant), gradient clipping (`max_grad_norm`).
- Validation: `val_fraction` held out (or `val_dataset_split` of `val_dataset_dir`), evaluated every
  `eval_every` steps and at the end.
- Outputs: adapter/ or model/ (export.py), metrics.jsonl, summary.json, loss.png (metrics.py), config.yaml.
- Checkpoints (checkpoint.py): sharded and atomic every `save_every` steps and at the end, `keep_last` kept;
  `resume: auto` continues from the newest complete one (`never`, or a path); one metrics.jsonl history.
  A finished job is not trained again; a larger `max_steps` extends it; another model, method, dataset or
  batch shape is refused.

State a checkpoint needs: `state.step` (optimizer steps done; the epoch and the data position follow from it
through `plan`), `model.net`, `optimizer`, `scheduler`, `metrics`, `cfg`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pkg.trainer import (
    batching,
    checkpoint,
    checkpoint_dirs,
    data_cache,
    disk_space,
    distributed,
    dpo,
    export,
    fingerprint,
    host_memory,
    model,
    optim,
    output_lock,
    plan,
    resilience,
    sft,
    trackers,
    vocab_parallel,
)
from pkg.trainer.config import TrainConfig, resolve_in_backward, save_config
from pkg.trainer.errors import TrainerError
from pkg.trainer.loss import check_head
from pkg.trainer.metrics import Metrics
from pkg.trainer.objective import Objective, Setup, means
from pkg.trainer.safetensors_stream import StreamReader

log = logging.getLogger("pkg.trainer")

OBJECTIVES: dict[str, type[Objective]] = {"sft": sft.SFT, "dpo": dpo.DPO}  # config's `objective`


@dataclass
class TrainState:
    """Where the run is: `step` optimizer steps are done; the next one trains on `plan.global_batch(step)`.

    A checkpoint keeps `step` and `tokens_seen`; the rest starts over on resume."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # nan_policy skip_step: steps whose update was skipped, in all ...
    skipped_in_a_row: int = 0  # ... and since the last finite one
    train_time: float = 0.0  # seconds the steps took, wall and CPU (summary.json)
    train_cpu: float = 0.0


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the peak learning rate at each step: linear warmup, then the chosen decay."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return step / cfg.warmup_steps if cfg.warmup_from_zero else (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def rebase_schedule(scheduler, learning_rate: float, step: int) -> tuple[float, float]:
    """Put a resumed scheduler on this run's schedule at `step`; returns (checkpoint's lr, this run's lr).

    The schedule is a function of (step, this run's length): extending a finished cosine or linear run
    with a larger max_steps stretches the decay over the new length, so the lr picks up at the new
    schedule's value for that step (the caller logs the jump) rather than staying at the old end point.
    """
    before = scheduler.get_last_lr()[0]
    scheduler.base_lrs = [learning_rate] * len(scheduler.optimizer.param_groups)
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return before, scheduler.get_last_lr()[0]


# nan_policy skip_step: a batch can be bad once; this many non-finite steps in a row mean broken weights.
MAX_SKIPPED_IN_A_ROW = 5


def prepare_output_dir(cfg: TrainConfig) -> None:
    """Create output_dir, or say in one line why it cannot be this run's (rank 0)."""
    out = Path(cfg.output_dir)
    for name in ("model_dir", "dataset_dir"):
        inside = Path(getattr(cfg, name)).resolve()
        if out.resolve() == inside or inside in out.resolve().parents:
            raise TrainerError(
                f"output_dir {out} is inside {name} {inside}: the run's outputs would become part of its "
                f"input on the next run; put output_dir beside it (e.g. {inside.parent / 'output'})"
            )
    if out.exists() and not out.is_dir():
        raise TrainerError(f"output_dir {out} is a file, not a folder: set output_dir to a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise TrainerError(
            f"output_dir {out} is not writable ({exc.strerror or exc}): mount it read-write or choose "
            "another folder"
        ) from None


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated, or on a CPU the resident set's high-water mark.

    Not ru_maxrss where /proc has VmHWM: Linux folds the memory of the process that forked this one into
    ru_maxrss at exec, so a worker started by a large parent (a test runner, a notebook) reported the parent's
    size instead of its own.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class BuiltModel:
    """The model as built for training (`Recipe.build_model`), and how the loop treats its gradients."""

    net: torch.nn.Module
    param_counts: dict[str, int]  # trainable_params, total_params (summary.json)
    sharded: bool  # FSDP2 (never a 4-bit QLoRA base)
    hybrid: bool  # hybrid sharding: shard groups replicated over nodes (distributed.Layout)
    aux_coef: float  # an MoE model's router load-balancing loss coefficient; 0 for a dense model
    # LoRA under FSDP: gradients (a small adapter) accumulate locally and are reduced once, after the last
    # micro-batch, instead of one reduce-scatter per micro-batch. Full fine-tuning keeps syncing: unsharded
    # gradients of every weight would cost a whole model's memory per rank.
    defer_sync: bool
    # QLoRA: the 4-bit base is not sharded; each rank holds the whole small adapter, all-reduced here.
    all_reduce: bool
    world_size: int

    def gradient_sync(self, last_micro_batch: bool) -> None:
        """Before each micro-batch's backward: whether FSDP reduces the gradients in it."""
        if self.defer_sync:
            self.net.set_requires_gradient_sync(last_micro_batch)

    def reduce_gradients(self) -> None:
        """After a step's last backward: the gradients FSDP does not reduce itself, averaged over ranks."""
        if self.all_reduce and self.world_size > 1:
            for p in self.net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size
        if self.hybrid:  # the split rows' gradients, averaged over the replicas as FSDP does its own
            vocab_parallel.reduce_replicas(self.net)


class Recipe:
    """setup, train, save (`run`). Every attribute is set in `__init__` or in `setup`, in this order:"""

    cfg: TrainConfig
    out: Path  # output_dir
    lock: output_lock.OutputLock | None  # this job's hold on output_dir (rank 0)
    metrics: Metrics | None  # metrics.jsonl, progress lines, trackers (closed on failure once opened)
    dist: distributed.DistInfo
    checkpointing: bool  # save_every, and output_dir one volume every rank sees (cfg stays as given)
    fingerprint: dict[str, str]  # what a checkpoint must match to be resumed (checkpoint.run_fingerprint)
    tokenizer: Any
    train_data: Any  # tokenized records (data_cache.read_cache)
    val_data: Any
    plan: batching.BatchPlan  # which records each rank trains on at each step
    total_steps: int
    bf16: bool
    model: BuiltModel
    objective: Objective  # SFT or DPO: the loss of a micro-batch, its metrics, validation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.lock = None
        self.metrics = None

    def run(self) -> dict:
        """Train and save; the summary (summary.json), or a finished run's when there is nothing to train."""
        try:
            finished = self.setup()
            if finished:
                return finished
            self.train()
            return self.save()
        except BaseException:
            if self.metrics:
                self.metrics.close()
            raise
        finally:
            if self.lock:
                self.lock.release()
            distributed.shutdown()

    # ------------------------------------------------------------ setup

    def setup(self) -> dict | None:
        """Everything the run needs, in order; returns instead the summary of an already finished run."""
        cfg = self.cfg
        self.dist = distributed.init(cfg.dist_timeout_minutes)
        self.claim_output_dir()
        self.checkpointing = bool(cfg.save_every) and checkpoint_dirs.shared_by_all_ranks(self.out)
        if cfg.save_every and not self.checkpointing and self.dist.is_main:
            log.warning(
                "output_dir %s is not one volume shared by every node: checkpoints are off, save_every %d "
                "ignored (mount a ReadWriteMany volume there to make the run resumable)",
                self.out, cfg.save_every,
            )  # fmt: skip
        self.fingerprint = fingerprint.run_fingerprint(cfg)
        finished = self.finished_run()
        if finished:
            log.info(
                "already finished: %s holds the outputs of this job (%d steps); nothing to train. "
                "Raise max_steps to train further, or set resume: never to start over",
                self.out, finished["steps"],
            )  # fmt: skip
            return finished
        if self.dist.is_main:
            save_config(cfg, self.out / "config.yaml")
            log.info("config: %s", " ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
        kind = OBJECTIVES[cfg.objective]
        self.tokenizer = model.load_tokenizer(cfg.model_dir)
        self.train_data, self.val_data = self.load_data(kind.build_splits)
        self.plan = batching.BatchPlan(
            len(self.train_data), cfg.global_batch_size, cfg.micro_batch_size,
            self.dist.world_size, self.dist.rank, cfg.seed, cfg.max_steps_per_epoch,
            lengths=[sum(lens) for lens in self.train_data["seq_lens"]], shuffle=cfg.shuffle,
        )  # fmt: skip
        self.total_steps = cfg.max_steps or cfg.num_epochs * self.plan.steps_per_epoch
        if cfg.warmup_steps >= self.total_steps and self.dist.is_main:
            log.warning(
                "warmup_steps %d >= the run's %d steps: the learning rate never reaches learning_rate "
                "(%g) and never decays; lower warmup_steps", cfg.warmup_steps, self.total_steps,
                cfg.learning_rate,
            )  # fmt: skip
        in_backward, why = resolve_in_backward(cfg, self.dist.world_size)
        if in_backward and self.plan.grad_accum != 1:  # optimizer_in_backward: true (auto never is)
            raise TrainerError(
                "optimizer_in_backward steps at the end of each backward: it needs one micro-batch per "
                f"step, not {self.plan.grad_accum}; set micro_batch_size to global_batch_size / world size "
                f"({cfg.global_batch_size // self.dist.world_size})"
            )
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.dist.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        self.model = self.build_model(cfg)

        def build_other(model_dir: str) -> torch.nn.Module:  # DPO's reference_model_dir
            return self.build_model(dataclasses.replace(cfg, model_dir=model_dir)).net

        # Before resume(): DPO on full fine-tuning takes its reference from the freshly loaded model.
        self.objective = kind.create(
            Setup(
                cfg=cfg, dist=self.dist, model=self.model.net, router_loss=bool(self.model.aux_coef),
                pad_token_id=self.tokenizer.pad_token_id, plan=self.plan, train_data=self.train_data,
                val_data=self.val_data, out=self.out, build_model=build_other,
            )
        )  # fmt: skip
        self.optimizer = optim.build(self.model.net, cfg, self.dist.device, self.model.sharded, in_backward)
        log.info(
            "optimizer %s, stepped %s (%s)", cfg.optimizer,
            "in the backward, one weight at a time" if in_backward else "after the backward", why,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        self.state, tracker_ids = self.resume()
        reporters, error = None, None
        if self.dist.is_main:  # report_to trackers and the TrainJob status: rank 0 only
            try:
                reporters = trackers.open_reporters(
                    cfg, self.total_steps, self.state.step, self.plan.steps_per_epoch, tracker_ids
                )
            except TrainerError as exc:
                error = str(exc)
        self.metrics = Metrics(self.out, self.total_steps, self.dist.is_main, cfg.disk_log_dir, reporters)
        self.metrics.rewind(self.state.step)  # one history: the records after the resumed step go
        distributed.agree(error)
        log.info(
            "world size %d, %d train / %d val sequences, %d steps (%d per epoch), gradient accumulation %d",
            self.dist.world_size, len(self.train_data), len(self.val_data), self.total_steps,
            self.plan.steps_per_epoch, self.plan.grad_accum,
        )  # fmt: skip
        return None

    def claim_output_dir(self) -> None:
        """Before anything is written (rank 0): the output_dir, the model's files, then this job's lock."""
        cfg, error = self.cfg, None
        if self.dist.is_main:
            try:
                prepare_output_dir(cfg)
                model.check_architecture(cfg.model_dir)  # a model that cannot train leaves nothing behind
                model.check_tokenizer_files(cfg.model_dir)
                self.lock = output_lock.OutputLock(self.out).acquire()
                export.remove_leftovers(self.out)
            except TrainerError as exc:
                error = str(exc)
        distributed.agree(error)

    def finished_run(self) -> dict | None:
        """The summary of this very job when output_dir holds its final outputs already (resume allowing)."""
        cfg = self.cfg
        if checkpoint_dirs.resume_mode(cfg.resume) == "never":
            return None
        length = {"max_steps": cfg.max_steps, "num_epochs": cfg.num_epochs}
        full = cfg.method == "full"
        outputs = [self.out / "adapter"] * (not full) + [self.out / "model"] * (full or cfg.merge_adapter)
        return checkpoint_dirs.finished_run(self.out, self.fingerprint, length, outputs)

    def load_data(self, build) -> tuple[Any, Any]:
        """Tokenize with `build` (the objective's build_splits) on rank 0 (and on each node's first rank if
        output_dir is not shared); read everywhere."""
        cfg = self.cfg
        path = self.out / "cache" / f"tokenized-{data_cache.cache_key(cfg, cfg.model_dir)}"
        datasets_cache = str(self.out / "cache" / "datasets")
        for builder in (self.dist.is_main, self.dist.local_rank == 0):
            error = None
            if builder and not path.exists():
                try:
                    log.info("tokenizing %s into %s", cfg.dataset_dir, path)
                    # forked: datasets, pyarrow and the tokenizing's garbage never reside in training
                    host_memory.apart(
                        lambda: data_cache.write_cache(build(cfg, self.tokenizer, datasets_cache), path)
                    )
                except TrainerError as exc:
                    error = str(exc)
            distributed.agree(error)
        splits = data_cache.read_cache(path)
        return splits["train"], splits["val"]

    def build_model(self, cfg: TrainConfig) -> BuiltModel:
        """The model of cfg.model_dir for cfg.method, loaded, sharded and checked (DPO's reference_model_dir
        is built the same way)."""
        # At world size > 1 every rank builds the model on the meta device and shards it; rank 0 then streams
        # the weights from model_dir into the shards one tensor at a time, so a node holds one copy of the
        # weights in host memory (the shards), not one per rank, and rank 0 never holds a whole model next
        # to its shards. A 4-bit QLoRA base is neither sharded nor broadcast: each rank loads it to its GPU.
        from_rank0 = self.dist.world_size > 1 and cfg.method != "qlora"
        net, sources = self.load(cfg, from_rank0)
        model.check_vocabulary(net, self.tokenizer, cfg.model_dir)  # the same model on every rank
        trainable, total = model.count_parameters(net)
        log.info("%s: %d trainable of %d parameters", cfg.method, trainable, total)
        # never a 4-bit base
        sharded = cfg.method != "qlora" and distributed.uses_fsdp(self.bf16, cfg.cpu_offload)
        layout = self.choose_layout(cfg, net, sharded)
        # Under hybrid sharding the vocabulary is split within the shard group (a node) only. Under CPU
        # offload the embedding and head are FSDP units, offloaded like the rest.
        split = sharded and not cfg.cpu_offload and vocab_parallel.wanted(
            cfg.vocab_parallel, layout.group_size or self.dist.world_size,
            cfg.micro_batch_size * cfg.max_seq_length, net.config.vocab_size,
        )  # fmt: skip
        if cfg.cpu_offload and cfg.vocab_parallel == "always":
            log.warning("vocab_parallel: always is not applied under cpu_offload (the two are FSDP units)")
        how = distributed.Sharding(self.dist.device, self.bf16, split, layout)
        if sources is not None:
            log.info("rank 0 streams the weights into the shards of %d ranks", self.dist.world_size)
            reader = StreamReader(Path(cfg.model_dir)) if self.dist.is_main else None

            def read(name: str, rows: slice | None) -> torch.Tensor:
                source = sources[name]
                if isinstance(source, str):
                    return reader.read(source, rows)
                return source if rows is None else source[rows]

            fetch = read if reader else None
            net = distributed.shard_streamed(net, how, fetch)
        elif from_rank0:
            log.info("rank 0 read the weights; %d ranks receive them by broadcast", self.dist.world_size - 1)
            net = distributed.shard_from_rank0(net, how)
        elif cfg.method != "qlora":  # a 4-bit base is not sharded; its small adapter is all-reduced instead
            net = distributed.shard(net, how)
        if split:
            names = [type(m).__name__ for m in net.modules() if isinstance(m, vocab_parallel.SPLIT)]
            log.info(
                "vocab_parallel: %s", ", ".join(names) or "nothing split (a tied head with LoRA stays whole)"
            )
        check_head(net, self.dist.device)
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs per rank
        aux_coef = model.router_aux_coef(net)
        if aux_coef:
            log.info("mixture-of-experts: router load-balancing loss added with coefficient %g", aux_coef)
        return BuiltModel(
            net, {"trainable_params": trainable, "total_params": total}, sharded, layout.hybrid, aux_coef,
            defer_sync=cfg.method == "lora" and hasattr(net, "set_requires_gradient_sync"),
            all_reduce=cfg.method == "qlora", world_size=self.dist.world_size,
        )  # fmt: skip

    def choose_layout(self, cfg: TrainConfig, net: torch.nn.Module, sharded: bool) -> distributed.Layout:
        """`sharding` and `shard_group_size` as a Layout (unsharded: none); logs it with the planner's
        per-rank estimate."""
        info = self.dist
        try:
            shape = plan.Shape.from_config(net.config.to_dict())
        except ValueError as exc:  # the estimate is advice: a shape it cannot read never stops training
            shape = None
            log.info("plan: no estimate (%s)", exc)
        cluster = plan.Cluster(
            max(1, info.world_size // info.local_world_size), info.local_world_size,
            plan.device_memory(info.device) // (1 if info.device.type == "cuda" else info.local_world_size),
            info.device.type,
        )  # fmt: skip
        targets = batching.most_targets(self.train_data, cfg.micro_batch_size)  # they size the loss block
        job = plan.job_from_config(cfg, self.bf16, targets, world_size=info.world_size)

        def fits(group: int) -> bool:
            return shape is not None and plan.estimate(shape, job, cluster, group)["fits"]

        layout = distributed.Layout()
        if sharded:
            try:
                layout = distributed.resolve_layout(
                    cfg.sharding, cfg.shard_group_size, info.world_size, info.local_world_size, fits,
                    cfg.cpu_offload,
                )  # fmt: skip
            except ValueError as exc:
                raise TrainerError(str(exc)) from None
        summary = "unavailable"
        if shape is not None:
            summary = plan.summary(plan.estimate(shape, job, cluster, layout.group_size or info.world_size))
        log.info(
            "sharding %s (%s%s); plan: %s", cfg.sharding,
            layout.describe(info.world_size) if sharded else "not sharded",
            ", cpu_offload" if cfg.cpu_offload else "", summary,
        )  # fmt: skip
        return layout

    def load(self, cfg: TrainConfig, from_rank0: bool) -> tuple[torch.nn.Module, dict | None]:
        """(model, where rank 0 streams its tensors from, or None when rank 0 read them all already).

        With `from_rank0` every rank builds on the meta device and rank 0 works out the sources; when the
        checkpoint does not map one for one onto the model (model.load_model_on_meta), rank 0 reads the
        whole model with from_pretrained instead, as it would alone, and broadcasts it after sharding.
        """
        main = self.dist.is_main
        net, sources, error = None, None, None
        torch.manual_seed(cfg.seed)  # identical initial adapters on every rank and world size
        try:
            if from_rank0:
                net, sources = model.load_model_on_meta(cfg, plan=main)
            else:
                net = model.load_model(cfg, self.dist.device)
        except TrainerError as exc:
            error = str(exc)
        distributed.agree(error)  # rank 0 failing to read the weights must not leave the others waiting
        if not from_rank0:
            return net, None
        why_not = distributed.broadcast_object(sources if isinstance(sources, str) else None)
        if why_not is None:
            return net, sources if main else {}
        if main:
            log.info("streaming the weights is not possible (%s): rank 0 reads the whole model", why_not)
            torch.manual_seed(cfg.seed)
            try:
                net = model.load_model(cfg, self.dist.device)
            except TrainerError as exc:
                error = str(exc)
        distributed.agree(error)
        return net, None

    def resume(self) -> tuple[TrainState, dict[str, str]]:
        """Continue from a checkpoint (`resume`): weights, optimizer, scheduler, data position and RNG.
        Returns where the run is and the report_to run ids to continue (a fresh state and none when it
        starts afresh)."""

        def load(path: Path) -> checkpoint.Resumed:
            step = checkpoint_dirs.read_meta(path)["step"]
            if step > self.total_steps:
                raise TrainerError(
                    f"checkpoint {path} is at step {step}, past this run's {self.total_steps} steps: "
                    "raise max_steps (or num_epochs), or set resume: never to start over"
                )
            return checkpoint.load_checkpoint(
                path, self.model.net, self.optimizer, self.scheduler, fingerprint=self.fingerprint
            )

        # A newest checkpoint that fails to load is moved aside and the previous one loaded instead.
        resumed = checkpoint.load_resume(self.out, self.cfg.resume, load)
        if resumed is None:
            return TrainState(), {}
        # This run's schedule applies from here on (max_steps or learning_rate may have changed).
        before, after = rebase_schedule(self.scheduler, self.cfg.learning_rate, resumed.step)
        log.info("resuming from step %d of %d (%s)", resumed.step, self.total_steps, resumed.path)
        if not math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-12):
            log.warning(
                "learning-rate schedule: now %s over %d steps (max_steps, num_epochs or learning_rate "
                "changed); the lr of step %d is %.3g where the checkpoint's schedule had %.3g",
                self.cfg.lr_scheduler, self.total_steps, resumed.step + 1, after, before,
            )  # fmt: skip
        state = TrainState(resumed.step, int(resumed.data_state.get("tokens_seen", 0)))
        return state, dict(resumed.data_state.get("trackers") or {})

    # ------------------------------------------------------------ train

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        started, cpu_start = time.monotonic(), time.process_time()
        stop = resilience.StopRequest().install()  # SIGTERM: checkpoint at the next step boundary, exit 143
        try:
            while state.step < self.total_steps:
                step_started = time.monotonic()
                result = self.train_step(state.step)
                state.step += 1
                self.check_finite(state.step, result)
                state.tokens_seen += int(result["tokens"])
                last = state.step == self.total_steps
                if state.step % cfg.log_every == 0 or last:
                    rate = result["tokens"] / max(time.monotonic() - step_started, 1e-9)
                    extra = {k: result[k] for k in self.objective.metrics[1:]}
                    self.metrics.train_step(
                        state.step, result["loss"], result["lr"], result["grad_norm"], rate,
                        result.get("aux_loss"), extra,
                    )  # fmt: skip
                if len(self.val_data) and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last):
                    scores = self.evaluate()
                    self.metrics.val_step(state.step, scores.pop("val_loss"), scores)
                saved = self.checkpointing and (state.step % cfg.save_every == 0 or last)
                if saved:
                    self.save_checkpoint()
                if stop.should_stop():
                    if self.checkpointing and not saved:
                        self.save_checkpoint()
                    note = "no checkpoint"
                    if self.checkpointing:
                        note = f"checkpoint saved in {self.out}/checkpoints"
                    raise resilience.Preempted(
                        f"stopped by {stop.describe()} after step {state.step}; {note}; "
                        "rerun the job to resume"
                    )
        finally:  # a run that stops on an error leaves the process's own handlers (in-process callers, tests)
            stop.uninstall()
        state.train_time = time.monotonic() - started
        state.train_cpu = time.process_time() - cpu_start  # what the steps cost, however loaded the machine

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on the global batch of `step`; returns the global-batch loss and counts."""
        indices = self.plan.micro_batches(step)
        micro = [[self.train_data[i] for i in mb] for mb in indices]
        counts = [self.objective.count(recs) for recs in micro]
        n_targets, n_tokens = distributed.all_reduce_sum(
            [sum(c[0] for c in counts), sum(c[1] for c in counts)], self.dist.device
        )
        if not n_targets:  # every row of this global batch lacks a target token (data.tokenized_samples)
            return self.no_target_step(step, n_tokens)
        # FSDP averages gradients over ranks; scaling by the world size turns that into the global mean.
        scale = self.dist.world_size / n_targets
        net = self.model.net
        net.train()
        totals: list[float] = []
        router_total, router = 0.0, False
        for i, (recs, mb) in enumerate(zip(micro, indices, strict=True)):
            self.model.gradient_sync(i == len(micro) - 1)
            part = self.objective.micro_loss(net, recs, mb)
            loss = part.loss * scale
            if part.router_loss is not None:  # a mean per micro-batch: averaged over them, then weighted
                loss = loss + part.router_loss * (self.model.aux_coef / len(micro))
                router_total += part.router_loss.item()
                router = True
            loss.backward()
            totals = [a + b for a, b in zip(totals, part.sums, strict=True)] if totals else part.sums
        self.model.reduce_gradients()
        if isinstance(self.optimizer, optim.InBackward):  # stepped already; the norm of what it consumed
            grad_norm = self.optimizer.grad_norm(self.dist.device)
        else:
            params = [p for p in net.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        *sums, router_global = distributed.all_reduce_sum([*totals, router_total], self.dist.device)
        result = means(self.objective.metrics, sums, n_targets)
        result.update(lr=lr, grad_norm=float(grad_norm), tokens=n_tokens)
        # The same global numbers on every rank, so every rank takes the same branch. A non-finite step
        # never reaches the weights or the optimizer's moments (optimizer_in_backward has stepped already:
        # config.py allows it only with nan_policy: stop).
        result["finite"] = math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"])
        if result["finite"]:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if router:
            result["aux_loss"] = router_global / (len(micro) * self.dist.world_size)
        return result

    def no_target_step(self, step: int, n_tokens: int) -> dict[str, float]:
        """A step whose global batch has no target token: its loss, a mean over no token, is undefined, so
        no rank runs a pass and the weights and the optimizer's moments stay; the schedule moves on. (In
        torchtune 0.6.1 such a step scales its zero gradients by 1 / 0: NaN weights.)"""
        if self.dist.is_main:
            log.warning("step %d: no row of its batch has a target token; its update is skipped", step + 1)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        result = means(self.objective.metrics, [0.0] * len(self.objective.metrics), 0)
        return {**result, "lr": lr, "grad_norm": math.nan, "tokens": n_tokens, "finite": True}

    def check_finite(self, step: int, result: dict[str, float]) -> None:
        """Apply `nan_policy` to a step whose loss or gradient norm was NaN or inf (its update skipped)."""
        if result["finite"]:
            self.state.skipped_in_a_row = 0
            return
        what = f"step {step}: loss={result['loss']:.4g} grad_norm={result['grad_norm']:.4g}"
        fix = (
            "lower learning_rate, set max_grad_norm, or look for bad rows in the data, then rerun "
            "(it resumes from the last checkpoint; resume: never starts over)"
        )
        if self.cfg.nan_policy == "stop":
            # Stepped in the backward, the update is in the weights already; raising here, before the loop's
            # checkpoint and the export, keeps it out of everything written.
            applied = "stopped without applying it"
            if isinstance(self.optimizer, optim.InBackward):
                applied = "stopped; its update (stepped in the backward) reached no checkpoint"
            raise TrainerError(
                f"{what}: not finite; {applied} and wrote no final outputs (nan_policy: stop): {fix}"
            )
        self.state.skipped_in_a_row += 1
        self.state.skipped_steps += 1
        if self.state.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise TrainerError(
                f"{what}: not finite for {MAX_SKIPPED_IN_A_ROW} steps in a row (nan_policy: skip_step): "
                f"the weights no longer train; stopped with no final outputs: {fix}"
            )
        if self.dist.is_main:
            log.warning("%s: not finite; this step's update is skipped (nan_policy: skip_step)", what)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation over the whole held-out set, shared across ranks: val_loss and the objective's val_
        metrics."""
        self.model.net.eval()
        batches = self.plan.val_batches(len(self.val_data))
        return self.objective.evaluate(self.model.net, self.val_data, batches)

    # ------------------------------------------------------------ save

    def save_checkpoint(self) -> Path:
        self.check_lock()
        error = None
        if self.dist.is_main:  # a save writes the new checkpoint whole before it deletes the oldest
            newest = checkpoint_dirs.latest_checkpoint(self.out)
            # Without one to measure: fp32 weights and AdamW's two moments of every trained parameter.
            trainable = self.model.param_counts["trainable_params"]
            needed = disk_space.size_of(newest) if newest else 12 * trainable
            keep = self.cfg.keep_last
            error = disk_space.space_problem(
                self.out, int(needed * 1.05) + 2**20, f"the checkpoint of step {self.state.step}",
                f" (with keep_last: {keep}, output_dir holds {keep + 1} checkpoints while the next is saved, "
                f"~{disk_space.gib((keep + 1) * needed)})",
            )  # fmt: skip
        distributed.agree(error)
        state = self.state
        return checkpoint.save_checkpoint(
            self.out, state.step, self.model.net, self.optimizer, self.scheduler,
            fingerprint=self.fingerprint, keep_last=self.cfg.keep_last,
            data_state={"step": state.step, "tokens_seen": state.tokens_seen,
                        "epoch": state.step // self.plan.steps_per_epoch,
                        # rank 0's report_to run ids (rank 0 writes meta.json), continued on resume
                        "trackers": self.metrics.reporters.ids() if self.metrics.reporters else {}},
        )  # fmt: skip

    def save(self) -> dict:
        # Training is over: the optimizer state (twice the trainable weights) and the gradients go before the
        # export gathers weights, so the end of a run never needs more memory than training did.
        for part in optim.parts(self.optimizer):
            part.state.clear()
        self.optimizer.zero_grad(set_to_none=True)
        distributed.agree(self.non_finite_weight())  # nothing final from broken weights
        self.check_lock()
        distributed.agree(self.export_space_problem() if self.dist.is_main else None)
        written = export.export(self.model.net, self.cfg, self.dist.is_main)
        if self.cfg.torchtune_layout and self.dist.is_main and written:
            last_epoch = (self.total_steps - 1) // self.plan.steps_per_epoch
            written.append(export.torchtune_layout(Path(self.cfg.output_dir), written, last_epoch))
        summary = self.metrics.finish(
            {
                "method": self.cfg.method,
                "objective": self.cfg.objective,
                "world_size": self.dist.world_size,
                "total_steps": self.total_steps,
                "max_steps": self.cfg.max_steps,
                "num_epochs": self.cfg.num_epochs,
                "fingerprint": self.fingerprint,
                "tokens_seen": self.state.tokens_seen,
                "skipped_steps": self.state.skipped_steps,
                "train_time_s": round(self.state.train_time, 3),
                "train_cpu_s": round(self.state.train_cpu, 3),
                "peak_memory_mb": round(peak_memory_mb(self.dist.device), 1),
                **self.model.param_counts,
                "outputs": [str(p) for p in written],
            }
        )
        if self.dist.is_main:
            log.info("done: %s", ", ".join(str(p) for p in written) or "no outputs")
        return summary

    def export_space_problem(self) -> str | None:
        """One line when output_dir's volume cannot hold the final outputs, else None (rank 0)."""
        cfg, needed = self.cfg, 0
        if cfg.method != "full":
            needed += 4 * self.model.param_counts["trainable_params"]  # adapter/ in fp32
        if cfg.method == "full" or cfg.merge_adapter:  # model/ in the checkpoint's own dtype
            needed += sum(f.stat().st_size for f in Path(cfg.model_dir).glob("*.safetensors"))
        return disk_space.space_problem(self.out, int(needed * 1.05) + 2**20, "writing the final outputs")

    def non_finite_weight(self) -> str | None:
        """One line naming a trained weight (this rank's shard of it) that holds NaN or inf, or None."""
        for name, param in self.model.net.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if param.requires_grad and not torch.isfinite(local).all():
                return (
                    f"the trained weight {name} holds NaN or inf after step {self.state.step}: no final "
                    "outputs written; lower learning_rate (or set max_grad_norm) and rerun with resume: never"
                )
        return None

    def check_lock(self) -> None:
        """Stop on every rank if another job has taken over output_dir (collective)."""
        distributed.agree(self.lock.lost() if self.lock else None)
