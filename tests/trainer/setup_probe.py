"""Set the trainer's model up (Recipe.setup) and report what each rank did; run by test_rank0_load.py.

    torchrun --nproc-per-node 2 tests/trainer/setup_probe.py REPORT_DIR --model_dir M --dataset_dir D ...

Each rank writes REPORT_DIR/rank{N}.json: how often it read the weights (`from_pretrained` calls), its peak
RSS after setup, whether the embeddings are still tied, the logits of a fixed batch, and the sum and norm
of every (gathered) weight and buffer.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import transformers

from pkg.trainer.__main__ import setup_logging
from pkg.trainer.config import load_config
from pkg.trainer.distributed import exit_process
from pkg.trainer.recipe import Recipe

reads = 0
_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained.__func__


def counting_from_pretrained(cls, *args, **kwargs):
    global reads
    reads += 1
    return _from_pretrained(cls, *args, **kwargs)


def main() -> None:
    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    transformers.AutoModelForCausalLM.from_pretrained = classmethod(counting_from_pretrained)
    setup_logging(main=False)
    recipe = Recipe(load_config(argv))
    recipe.setup()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    net = recipe.model.eval()
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
    report = {
        "rank": recipe.dist.rank,
        "weight_reads": reads,
        "peak_rss_mb": round(rss_mb, 1),
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
