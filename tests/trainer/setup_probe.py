"""Set the trainer's model up (Recipe.setup) and report what each rank did; run by test_rank0_load.py.

    torchrun --nproc-per-node 2 tests/trainer/setup_probe.py REPORT_DIR --model_dir M --dataset_dir D ...

Each rank writes REPORT_DIR/rank{N}.json: how often it read the whole model (`from_pretrained` calls) and
how many tensors it streamed from the safetensors files, its peak RSS after setup, the most host memory its
tensors held at any broadcast (where the loading holds the most), whether the embeddings are still tied,
the logits of a fixed batch, and the sum and norm of every (gathered) weight and buffer.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from pathlib import Path

import torch
import transformers

from pkg.trainer.__main__ import setup_logging
from pkg.trainer.config import load_config
from pkg.trainer.distributed import exit_process
from pkg.trainer.recipe import Recipe
from pkg.trainer.safetensors_stream import StreamReader

reads = streamed = live_peak = 0
_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__
_read = StreamReader.read


def counting_from_pretrained(cls, *args, **kwargs):
    global reads
    reads += 1
    return _from_pretrained(cls, *args, **kwargs)


def counting_read(self, name, rows=None):
    global streamed
    streamed += rows is None or rows.start == 0  # each tensor once, whole or from its first block
    return _read(self, name, rows)


def live_tensor_bytes() -> int:
    """Bytes of the distinct host storages behind every tensor object alive now (a DTensor by its shard)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            if not local.is_meta and local.device.type == "cpu":
                storage = local.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def sampling(collective):
    """`collective` (a broadcast or a send) noting first the host memory held by tensors: loading peaks
    while it sends tensors."""

    def sample(*args, **kwargs):
        global live_peak
        live_peak = max(live_peak, live_tensor_bytes())
        return collective(*args, **kwargs)

    return sample


def main() -> None:
    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(counting_from_pretrained)
    StreamReader.read = counting_read
    torch.distributed.broadcast = sampling(torch.distributed.broadcast)
    torch.distributed.send = sampling(torch.distributed.send)
    setup_logging(main=os.environ.get("RANK", "0") == "0")  # rank 0's log: the loading path it took
    recipe = Recipe(load_config(argv))
    recipe.setup()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    net = recipe.model.net.eval()
    ids = torch.tensor([[1, 5, 17, 99, 200, 31, 7, 64, 3, 250, 11, 42]])
    with torch.no_grad():
        logits = net(input_ids=ids, use_cache=False).logits
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    # Every weight and buffer, gathered whole: rank 0's LoRA init and rotary `inv_freq` must be everywhere.
    tensors = {}
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        tensors[name] = [full.double().sum().item(), full.double().norm().item()]
    sizes = {name: t.numel() * t.element_size() for name, t in base.named_parameters()}
    report = {
        "rank": recipe.dist.rank,
        "weight_reads": reads,
        "tensors_streamed": streamed,
        "peak_rss_mb": round(rss_mb, 1),
        "live_peak_bytes": live_peak,
        "weight_bytes": sum(sizes.values()),  # tied weights once
        "largest_weight_bytes": max(sizes.values()),
        "adapter_bytes": sum(size for name, size in sizes.items() if "lora_" in name),
        "tied": tied,
        "logits": logits.tolist(),
        "tensors": tensors,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{recipe.dist.rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # as the trainer leaves: a normal exit can abort in gloo's threads
