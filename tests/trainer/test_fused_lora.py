"""The fused LoRA linear computes what peft computes: outputs and every gradient, with and without dropout."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pkg.trainer import fused_lora

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


class Net(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40, bias=bias)
        self.down = nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_net(bias: bool, dropout: float, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    net = get_peft_model(
        Net(bias), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"])
    )
    for name, p in net.named_parameters():  # lora_B starts at zero: give it values so its path counts
        if "lora_B" in name:
            p.data.normal_()
    if fused:
        assert fused_lora.install(net) == 2
    return net


def outputs_and_grads(net: nn.Module, x: torch.Tensor, train: bool = True) -> list[torch.Tensor]:
    net.train(train)
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks for both
    y = net(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    return [y.detach(), x.grad, *grads]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_peft(bias, dropout, dtype):
    """bf16 is what FSDP's mixed precision hands the layers on GPU: same path, looser rounding."""
    x = torch.randn(3, 5, 24, dtype=dtype)
    expected = outputs_and_grads(lora_net(bias, dropout, fused=False).to(dtype), x)
    got = outputs_and_grads(lora_net(bias, dropout, fused=True).to(dtype), x)
    assert len(got) == len(expected) == 6  # y, dx, and A and B of both layers
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        else:  # bf16 keeps 8 bits of mantissa: compare whole tensors, not single elements
            assert ((g.float() - e.float()).norm() / e.float().norm()).item() < 1e-2


def test_fused_path_is_taken_and_falls_back_when_disabled(monkeypatch):
    net = lora_net(bias=True, dropout=0.0, fused=True)
    calls = []
    apply = fused_lora.LoraLinearFunction.apply
    monkeypatch.setattr(fused_lora.LoraLinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(2, 24)
    with_adapter = net(x)
    assert len(calls) == 2
    with net.disable_adapter():  # peft's own path: the base model alone
        base = net(x)
    assert len(calls) == 2
    torch.manual_seed(0)  # the same base weights as lora_net's
    torch.testing.assert_close(base, Net(bias=True)(x))
    assert not torch.allclose(base, with_adapter)


def test_no_grad_and_merged_adapter_agree():
    net = lora_net(bias=False, dropout=0.0, fused=True).eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        fused = net(x)
        merged = net.merge_and_unload()(x)
    torch.testing.assert_close(fused, merged, rtol=1e-5, atol=1e-5)
