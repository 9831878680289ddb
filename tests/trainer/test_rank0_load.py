"""At world size > 1 only rank 0 reads the pretrained weights: every rank builds the model on the meta
device and shards it, then rank 0 streams the safetensors files into the shards one tensor at a time, never
holding a whole model next to its shards. The result must equal a one-process load exactly: every weight
(LoRA's random init included), the rotary buffers and the tied embeddings. A checkpoint that transformers
converts on load (fused MoE experts), or DoRA, falls back to rank 0 reading the whole model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pkg.trainer.safetensors_stream import INDEX_NAME, StreamReader
from tests.trainer.conftest import (
    BASE_ARGS,
    PYTHON,
    ROOT,
    cli,
    finish,
    run_trainer,
    start,
    torchrun,
    trainer_env,
)
from tests.trainer.tiny import make_arch_model, make_tiny_model

PROBE = ROOT / "tests" / "trainer" / "setup_probe.py"


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    """The tiny model with `tie_word_embeddings` (one matrix for the input embeddings and the output head)."""
    from transformers import AutoConfig, LlamaForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("tied"))
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path


def probe(args: dict, report_dir: Path, nproc: int) -> dict[int, dict]:
    """Run setup_probe.py (one process, or torchrun with `nproc`); its report per rank (rank 0's with the
    run's log as `log`)."""
    cmd = [*torchrun(nproc), str(PROBE)] if nproc else [PYTHON, str(PROBE)]
    result = finish(start([*cmd, str(report_dir), *cli(args)], trainer_env()), timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    reports = {r["rank"]: r for r in (json.loads(p.read_text()) for p in report_dir.glob("rank*.json"))}
    reports[0]["log"] = result.stdout + result.stderr
    return reports


@pytest.fixture(scope="module")
def sharded_bf16_model(tmp_path_factory) -> Path:
    """The tiny model (untied) saved in bf16 across several safetensors files with an index."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("sharded"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    (path / "model.safetensors").unlink()
    model.save_pretrained(str(path), max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / INDEX_NAME).exists()
    return path


@pytest.fixture(scope="module")
def gemma2_model(tmp_path_factory) -> Path:
    """Tied, and with a buffer outside the state dict in a module with weights (the embedding's scale)."""
    return make_arch_model(tmp_path_factory.mktemp("gemma2"), "gemma2")


def checkpoint_tensors(model_dir: Path) -> int:
    return len(StreamReader(model_dir).entries)


@pytest.mark.parametrize(
    "model_fixture, method",
    [
        ("tied_model", "lora"),
        ("tied_model", "full"),
        ("sharded_bf16_model", "lora"),
        ("gemma2_model", "lora"),
    ],
)
def test_rank0_streams_the_weights_and_every_rank_equals_one_process(
    request, tmp_path, alpaca_data, model_fixture, method
):
    model_dir = request.getfixturevalue(model_fixture)
    args = {**BASE_ARGS, "model_dir": model_dir, "dataset_dir": alpaca_data, "method": method}
    [one] = probe({**args, "output_dir": tmp_path / "one"}, tmp_path / "report-one", nproc=0).values()
    two = probe({**args, "output_dir": tmp_path / "two"}, tmp_path / "report-two", nproc=2)

    assert one["weight_reads"] == 1
    # Rank 0 streams each checkpoint tensor once (a tied pair is one tensor); rank 1 reads nothing.
    assert [two[0]["weight_reads"], two[1]["weight_reads"]] == [0, 0]
    assert [two[0]["tensors_streamed"], two[1]["tensors_streamed"]] == [checkpoint_tensors(model_dir), 0]
    reference = torch.tensor(one["logits"])
    for rank in (0, 1):
        report = two[rank]
        tied = model_fixture != "sharded_bf16_model"
        assert one["tied"] == report["tied"] == tied, f"rank {rank}: tying changed"
        torch.testing.assert_close(torch.tensor(report["logits"]), reference, rtol=0, atol=1e-5)
        # Every weight and buffer, gathered: LoRA's random lora_A, the rotary inv_freq and the rest.
        assert report["tensors"].keys() == one["tensors"].keys()
        torch.testing.assert_close(report["tensors"], one["tensors"], rtol=1e-9, atol=0)
    names = one["tensors"].keys()
    assert any("inv_freq" in n for n in names)
    assert any("lora_A" in n for n in names) == (method == "lora")
    # Host memory held by rank 0's tensors whenever it sends one: its shards (half the weights at world size
    # 2), the block of rows being sent, read in the file's dtype and cast to fp32 (up to 0.75x the largest
    # weight at 2 ranks; a tensor of another layout would go whole: up to 1x), and the initial LoRA matrices
    # it keeps until they are sent. Measured: shards + half the largest weight + LoRA + about 100 bytes
    # (shard padding, small tensors of the setup), hence the 16 KiB. Reading the whole model and then filling
    # the shards from it held the model plus the shards filled so far: 1.5x the weights by the last broadcast
    # (measured), over this bound whenever the largest weight is under half of the weights.
    report = two[0]
    shards, largest = report["weight_bytes"] / 2, report["largest_weight_bytes"]
    assert largest < report["weight_bytes"] / 3
    bound = shards + largest + report["adapter_bytes"] + 16 * 1024
    assert report["live_peak_bytes"] <= bound, f"rank 0 held {report['live_peak_bytes']} bytes, over {bound}"


@pytest.mark.parametrize("case", ["moe", "dora"])
def test_rank0_reads_the_whole_model_when_streaming_cannot_match_it(tmp_path, tiny_model, alpaca_data, case):
    """A checkpoint whose tensors transformers converts on load (an MoE model's experts, one tensor per expert
    in the file, fused in the model) or an adapter initialised from the base weights (DoRA's magnitudes):
    rank 0 reads the model with from_pretrained, as before streaming, and says why once."""
    model_dir = make_arch_model(tmp_path / "moe", "qwen2_moe") if case == "moe" else tiny_model
    extra = {"use_dora": True} if case == "dora" else {}
    args = {**BASE_ARGS, "model_dir": model_dir, "dataset_dir": alpaca_data, "output_dir": tmp_path / "out"}
    two = probe({**args, **extra}, tmp_path / "report", nproc=2)

    assert [two[0]["weight_reads"], two[1]["weight_reads"]] == [1, 0]
    assert [two[0]["tensors_streamed"], two[1]["tensors_streamed"]] == [0, 0]
    reason = "converts Qwen2MoeForCausalLM's weights" if case == "moe" else "lora_magnitude_vector"
    [line] = [line for line in two[0]["log"].splitlines() if "streaming the weights is not possible" in line]
    assert reason in line, line


def test_unreadable_weights_fail_every_rank_with_one_line(tmp_path, tiny_model, alpaca_data):
    """Rank 0 alone reads the weights: when it cannot, the other ranks must stop too instead of waiting."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = {**BASE_ARGS, "model_dir": broken, "dataset_dir": alpaca_data, "output_dir": tmp_path / "out"}
    result = run_trainer(args, nproc=2, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "cannot load the model" in errors[0]  # printed by rank 0 once; rank 1 stopped without waiting


def test_each_rank_gets_its_part_of_a_tensor_of_any_layout(tmp_path):
    """fill_local: the part of a whole tensor that a DTensor's own mesh and placements give this rank (row and
    column shards, uneven ones too, a replica, a strided shard), as distribute_tensor computes it."""
    worker = ROOT / "tests" / "trainer" / "fill_local_worker.py"
    result = finish(start([*torchrun(2), str(worker)], trainer_env()), timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count(" OK") == 2


def test_a_truncated_checkpoint_is_refused_before_any_tensor_is_sent(tmp_path, tiny_model):
    """Rank 0 checks every file's size up front: a read failing halfway would leave the others waiting."""
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        StreamReader(broken)


def test_reading_rows_of_a_tensor_reads_exactly_those_rows(sharded_bf16_model):
    """Rank 0 reads each rank's block of rows straight from the file: any block, empty ones included."""
    reader = StreamReader(sharded_bf16_model)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        whole = reader.read(name)
        assert whole.dtype == torch.bfloat16
        for rows in (slice(0, 3), slice(5, whole.shape[0]), slice(7, 7), slice(0, whole.shape[0])):
            assert torch.equal(reader.read(name, rows), whole[rows]), (name, rows)
