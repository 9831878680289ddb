"""Will the job fit? Per-rank memory and traffic of a fine-tuning job, before a GPU is booked.

    python -m pkg.trainer.plan --config job.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB
    python -m pkg.trainer.plan --config job.yaml --nodes 1 --gpus-per-node 2 --device cpu --json
    python -m pkg.trainer.plan --config job.yaml --sample-rows 2000     # the loss targets of the data's rows

The model's shape comes from `model_dir/config.json` (or `--model-config FILE`); the job's settings from the
trainer's own config (the same YAML, the same `--key value` overrides). Per rank it estimates the sharded
weights, the trainable weights, gradients and optimizer state, the largest gathered layer, the activations of
one micro-batch, the loss chunk and the vocabulary split; their total against the device's memory; whether it
fits and, if not, the smallest change that does; and the bytes a step moves within and across nodes.
`--device cpu` predicts a rank's peak resident memory on a CPU host instead (the interpreter and its
libraries included): the same model as on a GPU, checked against measured peaks in tests/trainer/test_plan.py.
The trainer logs the same estimate at start.

The model of memory (bytes, per rank, g = ranks that share one copy of the weights, W = the world):
- weights: fp32 master weights / g (FSDP; QLoRA: a 4-bit base, whole, ~0.56 byte per weight, + adapters);
- gradients: fp32, / g (LoRA: whole, they accumulate unsharded until the last micro-batch);
  with optimizer_in_backward: one layer's;
- optimizer state: AdamW 8 bytes, 8-bit AdamW 2, SGD 0 per trainable weight, / g;
- gathered: FSDP holds the layer it runs and the next one it prefetches, in the compute dtype, and for full
  fine-tuning one layer's unsharded fp32 gradient before its reduce-scatter;
- activations: per token and layer, what the backward keeps of a decoder layer (~ 8 hidden + 4 intermediate
  values, SDPA attention); with activation checkpointing only each layer's input plus one layer's whole set;
- loss chunk: one block of logits, `loss_chunk_size` (or fewer: the micro-batch's target tokens) x the
  vocabulary in fp32 (and a bf16 copy under mixed precision), for a trained head a temporary of its size;
  every token is a target unless told otherwise (the trainer tells it the most target tokens a micro-batch
  of its tokenized data holds; the command line: `--sample-rows N` measures them on the dataset's first
  rows, `--target-fraction F` takes them as a share of the tokens);
- timing: a step's gradients appear in its backward as the activations and logits go, so with one
  micro-batch a step the peak holds the larger of the two, accumulating it holds both;
- cpu_offload moves weights, gradients and optimizer state to host memory (the step runs there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GiB = 1 << 30
ADAM_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# --device cpu: the resident memory of a trainer process besides the model (Python, torch, transformers,
# tokenizers, gloo, allocator slack; `datasets` and the tokenizing stay in a forked child): ~95 MiB less
# than when they did not, on every case of bench/bench_plan.py; bf16 on a CPU adds ~150 MiB whatever the
# model (oneDNN's bf16 kernels and their scratch). Calibrated on this project's machine with
# bench/bench_plan.py and the tests (tests/trainer/plan_check.py).
CPU_BASE = 425 * 2**20
CPU_BF16 = 140 * 2**20
# What the backward keeps per token of a decoder layer, in values of the compute dtype (SDPA attention: no
# sequence-squared term): the norms' outputs, q/k/v, the attention output, the MLP's four intermediates.
ACT_HIDDEN, ACT_INTER = 8, 4


def canonical_names(config: dict) -> dict:
    """config.json with transformers' standard names added where the architecture spells them its own way
    (gpt2's n_head, n_layer, n_embd: its config class's `attribute_map`)."""
    try:
        from transformers import CONFIG_MAPPING

        aliases = CONFIG_MAPPING[config["model_type"]].attribute_map
    except (ImportError, KeyError):
        return config
    return {**{name: config[spelt] for name, spelt in aliases.items() if spelt in config}, **config}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer, from its config.json."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    file_bytes: int = 2  # bytes per weight in the checkpoint files (config.json's torch_dtype)

    @staticmethod
    def from_config(config: dict) -> Shape:
        text = canonical_names(config.get("text_config") or config)  # multimodal wrappers nest the LM
        try:
            heads = int(text["num_attention_heads"])
            return Shape(
                layers=int(text["num_hidden_layers"]),
                hidden=int(text["hidden_size"]),
                intermediate=int(text.get("intermediate_size") or 4 * text["hidden_size"]),
                heads=heads,
                kv_heads=int(text.get("num_key_value_heads") or heads),
                vocab=int(text["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                qkv_bias=bool(text.get("attention_bias")) or text.get("model_type", "").startswith("qwen2"),
                file_bytes=4 if (config.get("torch_dtype") or config.get("dtype")) == "float32" else 2,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks a decoder's shape ({exc}): pass --model-config") from None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    def vocab_params(self) -> int:
        """Embedding and head together (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.vocab_params() + self.hidden

    def lora_params(self, rank: int, targets: list[str]) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        sizes = {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip
        names = ALL_LINEAR if "all-linear" in targets else [t for t in targets if t in sizes]
        per_layer = sum(rank * (a + b) for a, b in (sizes[n] for n in names))
        head = rank * (h + self.vocab) if "lm_head" in targets else 0
        return self.layers * per_layer + head


@dataclass(frozen=True)
class Job:
    """The settings of a TrainConfig that move memory (plan_for builds it from one)."""

    method: str = "lora"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    bf16: bool = True
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    micro_batch_size: int = 2
    max_seq_length: int = 1024
    loss_chunk_size: int = 512
    vocab_parallel: str = "auto"
    sharding: str = "auto"
    shard_group_size: int = 0
    global_batch_size: int = 0  # 0: unknown (gradients assumed to accumulate over micro-batches)
    targets_per_micro_batch: int = 0  # the most loss targets a micro-batch holds; 0: every token (worst case)


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    per_node: int = 1
    memory: int = 80 * GiB  # per rank: a GPU's memory, or a CPU host's memory / processes per node
    device: str = "cuda"
    host: int = 2048 * GiB  # a node's host memory, for what cpu_offload puts there (a DGX H100's 2 TB)

    @property
    def world(self) -> int:
        return self.nodes * self.per_node


def group_size(job: Job, cluster: Cluster, fits_group=None) -> int:
    """Ranks sharing one copy of the weights (the recipe's distributed.resolve_layout rule)."""
    group = job.shard_group_size or cluster.per_node
    if job.sharding == "full" or group >= cluster.world:
        return cluster.world
    if job.sharding == "hybrid":
        return group
    spans = cluster.world > cluster.per_node
    return group if spans and (fits_group is None or fits_group(group)) else cluster.world


def estimate(shape: Shape, job: Job, cluster: Cluster, group: int | None = None) -> dict:
    """Per-rank bytes of each part, their total, and the bytes a step moves; see the module docstring."""
    if group is None:
        group = group_size(job, cluster, lambda g: estimate(shape, job, cluster, g)["fits"])
    world, replicas = cluster.world, cluster.world // group
    cb = 2 if job.bf16 else 4  # compute dtype
    full, qlora = job.method == "full", job.method == "qlora"
    lora = 0 if full else shape.lora_params(job.lora_rank, list(job.lora_targets))
    total = shape.params() + lora
    trainable = total if full else lora
    fsdp = not qlora and (world > 1 or job.bf16 or job.cpu_offload)
    shards = group if fsdp else 1
    tokens = job.micro_batch_size * job.max_seq_length
    targets = job.targets_per_micro_batch or tokens
    split = (  # the recipe's rule (vocab_parallel.wanted over the shard group)
        fsdp and not job.cpu_offload and job.vocab_parallel != "never"
        and (job.vocab_parallel == "always" or group * tokens <= 2 * shape.vocab)
    )  # fmt: skip

    # QLoRA: 4-bit blocks with their scales, and the adapters
    weights = int(shape.params() * 0.5625) + 4 * lora if qlora else 4 * total // shards
    grads = 4 * trainable // (shards if full else 1)
    if job.optimizer_in_backward and full:
        grads = 4 * shape.layer_params() // shards
    optimizer = ADAM_BYTES[job.optimizer] * trainable // shards
    layer = shape.layer_params() + (0 if full else lora // max(shape.layers, 1))
    gathered = 0
    if fsdp and shards > 1:
        biggest = layer if split or shape.tied else max(layer, shape.vocab * shape.hidden)
        gathered = 2 * biggest * cb + (4 * biggest if full else 0)
    per_layer_token = (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate) * cb
    activations = shape.layers * tokens * per_layer_token
    checkpointed = shape.layers * tokens * shape.hidden * cb + tokens * per_layer_token
    act = checkpointed if job.activation_checkpointing else activations
    # The fused head: one fp32 block of logits, chunk (or fewer target) tokens x the vocabulary (split: the
    # group's tokens x its rows, the same size), a bf16 copy of it under mixed precision; a trained head
    # adds one temporary of its (local) weight's size per chunk, and a split head's bf16 copy of its rows.
    head_rows = -(-shape.vocab // group) if split else shape.vocab
    loss_chunk = int(min(job.loss_chunk_size, targets) * shape.vocab * 4 * (1.5 if job.bf16 else 1))
    loss_chunk += head_rows * shape.hidden * ((4 if full else 0) + (2 if job.bf16 and split else 0))
    vocab_split = 4 * shape.vocab_params() // group if split else 0
    host = 0
    if job.cpu_offload:
        host, weights, grads, optimizer = weights + grads + optimizer, 0, 0, 0
    parts = {
        "weights": weights,
        "trainable_weights": 4 * trainable // (shards if (full or fsdp) else 1),
        "gradients": grads,
        "optimizer_state": optimizer,
        "gathered_layer": gathered,
        "activations": act,
        "activations_no_checkpointing": activations,
        "activations_checkpointing": checkpointed,
        "loss_chunk": loss_chunk,
        "vocab_split": vocab_split,
        "host_offload": host,
    }
    # A step's gradients appear in its backward as its activations and logits go. One micro-batch a step
    # (the optimizer's zero_grad frees them between steps): the larger of the two is the peak. Accumulating,
    # the earlier micro-batches' gradients sit under the next one's activations (in-backward: one layer's).
    accumulates = job.global_batch_size == 0 or job.global_batch_size > job.micro_batch_size * world
    transient = act + loss_chunk
    if accumulates or (job.optimizer_in_backward and full):
        transient += grads
    peak = weights + optimizer + gathered + max(grads, transient)
    loading = 0
    if cluster.device == "cpu":  # host memory is the device: offloaded state and the interpreter count
        base = CPU_BASE + (CPU_BF16 if job.bf16 else 0)
        peak += host + base
        if world == 1 or qlora:  # from_pretrained: the fp32 model beside the memory-mapped file
            loading = base + 4 * shape.params() + shape.file_bytes * shape.params()
            peak = max(peak, loading)
    parts["loading"] = loading
    parts["total"] = peak
    steps_bytes = traffic(shape, job, cluster, group, trainable, cb, split, tokens)
    return {
        "per_rank": parts,
        "loss_targets": targets,  # the target tokens of a micro-batch the loss chunk was sized for
        "group_size": group,
        "replicas": replicas,
        "vocab_parallel": split,
        "memory": cluster.memory,
        "fits": peak <= cluster.memory and host * cluster.per_node <= cluster.host,
        "traffic_per_step": steps_bytes,
    }


def traffic(shape, job, cluster, group, trainable, cb, split, tokens) -> dict:
    """Bytes one rank sends per micro-batch and per optimizer step, within a node and across nodes."""
    if job.method == "qlora" or cluster.world == 1:
        reduce = 2 * 4 * trainable if cluster.world > 1 else 0
        across = reduce if cluster.nodes > 1 else 0
        return {"within_node": reduce - across, "across_nodes": across}
    ring = (group - 1) / group
    params = shape.layers * shape.layer_params() + (0 if split else shape.vocab_params())
    gathers = 2 * params * cb * ring  # forward and backward all-gathers
    reduce_scatter = 4 * trainable * ring
    vocab = 4 * group * tokens * shape.hidden * cb * ring if split else 0
    sharded = int(gathers + reduce_scatter + vocab)
    replicas = cluster.world // group
    all_reduce = int(2 * 4 * trainable / group * (replicas - 1) / replicas) if replicas > 1 else 0
    if group <= cluster.per_node:  # hybrid: the shard group is one node
        return {"within_node": sharded, "across_nodes": all_reduce}
    return {"within_node": 0, "across_nodes": sharded + all_reduce}


def suggest(shape: Shape, job: Job, cluster: Cluster) -> str | None:
    """The smallest change that makes a job fit, or None when nothing tried does."""
    tries = [
        ("sharding: full", replace(job, sharding="full")),
        ("activation_checkpointing: true", replace(job, activation_checkpointing=True)),
        ("micro_batch_size: 1", replace(job, micro_batch_size=1, activation_checkpointing=True)),
        ("optimizer: adamw_8bit", replace(job, optimizer="adamw_8bit")) if cluster.world == 1 else None,
        ("cpu_offload: true", replace(job, cpu_offload=True, activation_checkpointing=True)),
        ("method: qlora", replace(job, method="qlora", activation_checkpointing=True))
        if job.method == "lora"
        else None,
    ]
    for name, candidate in filter(None, tries):
        if estimate(shape, candidate, cluster)["fits"]:
            return name
    return None


def job_from_config(cfg, bf16: bool, targets_per_micro_batch: int = 0, *, world_size: int = 1) -> Job:
    from pkg.trainer.config import resolve_in_backward  # the recipe's decision (optimizer_in_backward: auto)

    in_backward, _ = resolve_in_backward(cfg, world_size)
    return Job(
        method=cfg.method, lora_rank=cfg.lora_rank, lora_targets=tuple(cfg.lora_target_modules), bf16=bf16,
        optimizer=cfg.optimizer, optimizer_in_backward=in_backward, cpu_offload=cfg.cpu_offload,
        activation_checkpointing=cfg.activation_checkpointing, micro_batch_size=cfg.micro_batch_size,
        max_seq_length=cfg.max_seq_length, loss_chunk_size=cfg.loss_chunk_size,
        vocab_parallel=cfg.vocab_parallel, sharding=cfg.sharding, shard_group_size=cfg.shard_group_size,
        global_batch_size=cfg.global_batch_size, targets_per_micro_batch=targets_per_micro_batch,
    )  # fmt: skip


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device) -> int:
    """Memory of one rank's device: the GPU's, or for a CPU process the host's."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory()


def mib(n: int) -> str:
    if n < 10 * 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**20:,.0f} MiB" if n < 10 * GiB else f"{n / GiB:,.1f} GiB"


def summary(result: dict) -> str:
    """One line of the estimate, as the trainer logs it."""
    parts = result["per_rank"]
    shown = ("weights", "gradients", "optimizer_state", "gathered_layer", "activations", "loss_chunk")
    body = ", ".join(f"{k} {mib(parts[k])}" for k in shown if parts[k])
    verdict = "fits" if result["fits"] else "does NOT fit"
    targets = f"loss targets {result['loss_targets']:,} a micro-batch"
    return f"{mib(parts['total'])} per rank ({body}; {targets}) of {mib(result['memory'])}: {verdict}"


def report(shape: Shape, job: Job, cluster: Cluster, targets_from: str) -> str:
    result = estimate(shape, job, cluster)
    parts = result["per_rank"]
    layout = (
        f"hybrid: {result['replicas']} replicas x {result['group_size']} shards"
        if result["replicas"] > 1
        else f"full: one copy over {cluster.world} ranks"
    )
    lines = [
        f"{cluster.nodes} node(s) x {cluster.per_node} {cluster.device} rank(s), {job.method}, "
        f"{'bf16' if job.bf16 else 'fp32'}, sharding {layout}, vocabulary split: "
        f"{'yes, over ' + str(result['group_size']) + ' ranks' if result['vocab_parallel'] else 'no'}",
        "per rank:",
    ]
    lines += [f"  {k:<30} {mib(v):>12}" for k, v in parts.items() if k != "total"]
    lines.append(f"  {'total':<30} {mib(parts['total']):>12}   of {mib(cluster.memory)}")
    lines.append(f"loss targets per micro-batch: {result['loss_targets']:,}, {targets_from}")
    traffic_ = result["traffic_per_step"]
    lines.append(
        f"per micro-batch and rank: {mib(traffic_['within_node'])} within the node, "
        f"{mib(traffic_['across_nodes'])} across nodes"
    )
    if result["fits"]:
        lines.append("fits")
    else:
        change = suggest(shape, job, cluster)
        lines.append(f"does NOT fit; smallest change that fits: {change or 'more nodes'}")
    return "\n".join(lines)


# Public shapes (config.json values) for docs/scaling.md: Llama 3.2 1B, Llama 3.1 8B and 70B.
MODELS = {
    "1B": Shape(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True),
    "8B": Shape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
    "70B": Shape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, tied=False),
}
TABLE_JOB = Job(micro_batch_size=1, max_seq_length=2048, activation_checkpointing=True)
TABLE_NODES = (1, 2, 4, 8, 16)


def scaling_table(gpus: int = 8, memory: int = 80 * GiB) -> str:
    """docs/scaling.md's table: per-rank GiB under `sharding: auto` (and its layout) for each model, method
    and node count; where it does not fit, the smallest change that does."""
    head = "| model | method | " + " | ".join(f"{n} node{'s' * (n > 1)}" for n in TABLE_NODES) + " |"
    lines = [head, "|---|---|" + "--:|" * len(TABLE_NODES)]
    for name, shape in MODELS.items():
        for method in ("lora", "qlora", "full"):
            job = replace(TABLE_JOB, method=method)
            cells = []
            for nodes in TABLE_NODES:
                cluster = Cluster(nodes, gpus, memory)
                result = estimate(shape, job, cluster)
                total = f"{result['per_rank']['total'] / GiB:.1f}"
                layout = "hybrid" if result["replicas"] > 1 else ("full" if cluster.world > 1 else "")
                if result["fits"]:
                    cells.append(f"{total} {layout}".strip())
                else:
                    cells.append(f"**{total}** → {suggest(shape, job, cluster) or 'no'}")
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sampled_targets(cfg, rows: int) -> int:
    """The most target tokens a micro-batch holds among the first `rows` rows of dataset_dir, tokenized (and
    packed) as the trainer does. `datasets` reads the split's files whole; only the sample is tokenized."""
    from pkg.trainer import batching, data, model
    from pkg.trainer.errors import TrainerError

    if cfg.objective != "sft":
        raise TrainerError(
            f"--sample-rows measures SFT rows, not {cfg.objective} pairs: use --target-fraction"
        )
    tokenizer = model.load_tokenizer(cfg.model_dir)
    with tempfile.TemporaryDirectory() as cache:
        samples, _ = data.tokenized_samples(cfg, tokenizer, cache, cfg.dataset_dir, cfg.dataset_split, rows)
    records = batching.to_records(samples, cfg.packing, cfg.max_seq_length)
    return batching.most_targets(records, cfg.micro_batch_size)


def loss_targets(cfg, sample_rows: int, fraction: float | None) -> tuple[int, str]:
    """(target tokens of a micro-batch for the estimate, 0 for all of them; where that figure comes from)."""
    from pkg.trainer.errors import TrainerError

    tokens = f"micro_batch_size x max_seq_length = {cfg.micro_batch_size * cfg.max_seq_length:,} tokens"
    if sample_rows and fraction is not None:
        raise TrainerError("--sample-rows and --target-fraction both set the loss targets: give one of them")
    if sample_rows < 0 or (fraction is not None and not 0 < fraction <= 1):
        raise TrainerError("--sample-rows must be >= 1 and --target-fraction in (0, 1]")
    if sample_rows:
        where = f"measured: the most in a micro-batch of the first {sample_rows:,} rows of {cfg.dataset_dir}"
        return sampled_targets(cfg, sample_rows), where
    if fraction is not None:
        targets = max(1, math.ceil(fraction * cfg.micro_batch_size * cfg.max_seq_length))
        return targets, f"--target-fraction {fraction:g} of {tokens}"
    return 0, f"every token of {tokens} (the worst case; --sample-rows N or --target-fraction F for fewer)"


SIZE = re.compile(r"^\s*([\d.]+)\s*(GiB|GB|MiB|MB|G|M)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = SIZE.match(text)
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: expected a size like 80GiB or 24GB")
    unit = (match.group(2) or "GiB").lower()
    scale = {"gib": GiB, "g": GiB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}[unit]
    return int(float(match.group(1)) * scale)


def main(argv: list[str] | None = None) -> int:
    from pkg.trainer.config import load_config
    from pkg.trainer.errors import TrainerError

    parser = argparse.ArgumentParser(prog="python -m pkg.trainer.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (ignored with --device cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model-config", help="a config.json instead of model_dir/config.json")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--table", action="store_true", help="docs/scaling.md's table (1B/8B/70B, 8 x 80GiB)")
    parser.add_argument(
        "--sample-rows", type=int, default=0, metavar="N",
        help="measure the loss targets on dataset_dir's first N rows, tokenized as the trainer does",
    )  # fmt: skip
    parser.add_argument(
        "--target-fraction", type=float, metavar="F",
        help="the share of a micro-batch's tokens that are loss targets (default: all, the worst case)",
    )  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    if args.table:
        print(scaling_table())
        return 0
    try:
        cfg = load_config(rest)
        path = Path(args.model_config or Path(cfg.model_dir) / "config.json")
        try:
            shape = Shape.from_config(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainerError(f"cannot read the model's config {path}: {exc}") from None
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise TrainerError("--nodes and --gpus-per-node must be >= 1")
        if args.device == "cpu":
            memory = host_memory() // args.gpus_per_node
            bf16 = cfg.precision == "bf16"
        else:
            memory = parse_size(args.gpu_memory)
            bf16 = cfg.precision != "fp32"
        cluster = Cluster(args.nodes, args.gpus_per_node, memory, args.device)
        targets, targets_from = loss_targets(cfg, args.sample_rows, args.target_fraction)
        job = job_from_config(cfg, bf16, targets, world_size=cluster.world)
        if (cluster.world % (job.shard_group_size or cluster.per_node)) != 0:
            raise TrainerError("shard_group_size must divide nodes x gpus-per-node")
    except (TrainerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        result = estimate(shape, job, cluster)
        result.update(shape=asdict(shape), job=asdict(job), suggestion=suggest(shape, job, cluster))
        print(json.dumps({**result, "loss_targets_from": targets_from}))
    else:
        print(report(shape, job, cluster, targets_from))
    return 0


if __name__ == "__main__":
    sys.exit(main())
