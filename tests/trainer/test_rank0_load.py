"""At world size > 1 only rank 0 reads the pretrained weights; the other ranks build the model on the meta
device and receive rank 0's weights after sharding. The result must equal a one-process load exactly:
every weight (LoRA's random init included), the rotary buffers and the tied embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
from tests.trainer.tiny import make_tiny_model

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
    """Run setup_probe.py (one process, or torchrun with `nproc`); its report per rank."""
    cmd = [*torchrun(nproc), str(PROBE)] if nproc else [PYTHON, str(PROBE)]
    result = finish(start([*cmd, str(report_dir), *cli(args)], trainer_env()), timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    reports = [json.loads(p.read_text()) for p in report_dir.glob("rank*.json")]
    return {r["rank"]: r for r in reports}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_only_rank0_reads_the_weights_and_every_rank_equals_one_process(
    tmp_path, tied_model, alpaca_data, method
):
    args = {**BASE_ARGS, "model_dir": tied_model, "dataset_dir": alpaca_data, "method": method}
    [one] = probe({**args, "output_dir": tmp_path / "one"}, tmp_path / "report-one", nproc=0).values()
    two = probe({**args, "output_dir": tmp_path / "two"}, tmp_path / "report-two", nproc=2)

    assert one["weight_reads"] == 1
    assert [two[0]["weight_reads"], two[1]["weight_reads"]] == [1, 0], "rank 1 must not read the weights"
    reference = torch.tensor(one["logits"])
    for rank in (0, 1):
        report = two[rank]
        assert one["tied"] and report["tied"], f"rank {rank}: lm_head is no longer the input embedding"
        torch.testing.assert_close(torch.tensor(report["logits"]), reference, rtol=0, atol=1e-5)
        # Every weight and buffer, gathered: LoRA's random lora_A, the rotary inv_freq and the rest.
        assert report["tensors"].keys() == one["tensors"].keys()
        torch.testing.assert_close(report["tensors"], one["tensors"], rtol=1e-9, atol=0)
    names = one["tensors"].keys()
    assert any("inv_freq" in n for n in names)
    assert any("lora_A" in n for n in names) == (method == "lora")


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
