"""The chunked target-only loss (pkg/trainer/loss.py) equals the full-logits cross-entropy: loss, per-row
log-probabilities and every gradient, with tied and untied embeddings, LoRA on the head or not, Gemma 2's
logit soft-capping, in one process and under FSDP2 at 2 processes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pkg.trainer.errors import TrainerError
from pkg.trainer.loss import IGNORE_INDEX, check_head, chunked_loss_sum, token_logprobs
from tests.trainer.conftest import ROOT, finish, start, torchrun, trainer_env
from tests.trainer.loss_probe import CASES, batch, build, full_logits_loss, grads

# Measured over every case and chunk size: loss within 1.1e-7 relative, gradients within 7.4e-7 of each
# tensor's largest entry (fp32 summation order of chunks vs one pass); about 14x margin.
RTOL = 1e-5


@pytest.mark.parametrize("case", [*CASES, "full-untied", "full-tied", "full-softcap", "full-bias"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(case, chunk_size):
    reference = build(case.removeprefix("full-"), lora=not case.startswith("full-"))
    chunked = copy.deepcopy(reference)
    b = batch()
    expected = full_logits_loss(reference, b)
    expected.backward()
    got = chunked_loss_sum(chunked, b, chunk_size)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)
    want, have = grads(reference), grads(chunked)
    assert want.keys() == have.keys()
    if not case.startswith("full-"):  # LoRA: the head trains only with LoRA on it
        assert any("lm_head" in n for n in want) == case.endswith("lora-head")
    for name in want:
        torch.testing.assert_close(
            have[name], want[name], rtol=RTOL, atol=RTOL * want[name].abs().max().item()
        )


@pytest.mark.fast
@pytest.mark.parametrize("case", ["tied-lora-head", "full-untied"])
def test_fast_tier_chunked_loss_equals_the_full_logits_path(case):
    """Two cases of the test above at one chunk size: the fast tier's check of the loss."""
    test_chunked_loss_and_gradients_equal_the_full_logits_path(case, 7)


@pytest.mark.fast
def test_per_sequence_logprobs_are_each_rows_sum():
    """What preference training (DPO) needs: the summed log-probability of each row's target tokens."""
    import torch.nn.functional as F

    model, b = build("untied"), batch()
    b["labels"][2] = IGNORE_INDEX  # a row without targets sums to 0
    with torch.no_grad():
        lp = token_logprobs(model, b, chunk_size=5)
        logits = model(input_ids=b["input_ids"]).logits.float()[:, :-1]
        per_token = -F.cross_entropy(
            logits.transpose(1, 2), b["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
        )
    torch.testing.assert_close(lp.per_sequence(3), per_token.sum(1), rtol=RTOL, atol=1e-5)
    assert lp.logprobs.shape == lp.rows.shape == ((b["labels"][:, 1:] != IGNORE_INDEX).sum(),)


@pytest.mark.fast
def test_a_batch_without_targets_gives_zero_that_backpropagates():
    model, b = build("tied"), batch()
    b["labels"][:] = IGNORE_INDEX
    loss = chunked_loss_sum(model, b, 4)
    loss.backward()
    assert loss.item() == 0.0


@pytest.mark.fast
@pytest.mark.parametrize("case", ["untied", "tied"])
def test_the_backward_makes_one_head_sized_gradient(case):
    """The forward's empty logits (kept only to reach the root's output) add no head-sized zero gradient
    to the fused loss's: each would be a whole [vocab, hidden] tensor at full fine-tuning's peak."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, b = build(case, lora=False), batch()
    shape = model.get_output_embeddings().weight.shape
    made = []

    class HeadSized(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fresh = not func._schema.is_mutable and func is not torch.ops.aten.detach.default
            if fresh and isinstance(out, torch.Tensor) and out.shape == shape:
                made.append(func.__name__)
            return out

    loss = chunked_loss_sum(model, b, 4)
    with HeadSized():
        loss.backward()
    # the fused head's gradient and the embedding's (the same shape here); tied, also their sum
    assert len(made) == (2 if case == "untied" else 3), made


@pytest.mark.fast
def test_a_head_transform_the_loss_does_not_know_is_refused():
    model = build("untied", lora=False)
    check_head(model, torch.device("cpu"))  # a plain Llama passes
    inner = model.forward

    def scaled(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    with pytest.raises(TrainerError, match="not supported"):
        check_head(model, torch.device("cpu"))


# FSDP units (the head gathered per chunk), and the embedding and head split by vocabulary rows: with LoRA
# on a frozen head, full fine-tuning of untied, tied, soft-capped and biased heads, and a tied head with LoRA
# (which stays whole: one weight cannot be both). All in one launch (a launch costs 10-20 s here).
FSDP_CASES = ["tied-lora-head", "full-untied", "full-softcap"]
FSDP_CASES += [
    "vp-untied",
    "vp-full-untied",
    "vp-full-tied",
    "vp-full-softcap",
    "vp-full-bias",
    "vp-tied-lora-head",
]
# A rank whose micro-batch is all padding (a validation tail) takes part in every collective of the others.
FSDP_CASES += ["empty-full-untied", "empty-tied-lora-head", "empty-vp-full-untied"]


def test_under_fsdp2_at_two_processes_gradients_equal_the_full_logits_path(tmp_path):
    probe = ROOT / "tests" / "trainer" / "loss_probe.py"
    cmd = [*torchrun(2), str(probe), str(tmp_path / "r.json"), *FSDP_CASES]
    result = finish(start(cmd, trainer_env()), 400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for case in FSDP_CASES:
        reports = [json.loads((tmp_path / f"r-{case}-rank{r}.json").read_text()) for r in (0, 1)]
        split = ["VocabParallelEmbedding", "VocabParallelHead"]
        for r in reports:
            assert r["world_size"] == 2 and r["sharded"] and r["grads"] > 0, (case, r)
            assert r["vocab_parallel"] == (
                split if case.removeprefix("empty-").startswith("vp-") and "lora-head" not in case else []
            ), (case, r)
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=RTOL), (case, r)
            assert r["max_rel_grad_error"] < RTOL and r["logits_error"] < RTOL, (case, r)
        assert reports[0]["loss"] != reports[1]["loss"]  # the ranks' batches differ


@pytest.mark.fast
def test_vocab_parallel_auto_splits_where_it_moves_fewer_bytes():
    from pkg.trainer.vocab_parallel import wanted

    assert wanted("auto", 8, 4 * 2048, 151_936)  # 65k exchanged token rows vs 2 x 152k
    assert not wanted("auto", 64, 4 * 2048, 151_936)  # 524k: gathering the matrices moves less
    assert wanted("always", 64, 4 * 2048, 151_936) and not wanted("never", 2, 1, 151_936)
