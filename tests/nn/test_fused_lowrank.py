"""LowRankFunction (the LoRA branch as one autograd node) against the composed modules it replaces:
the same values and gradients, the same dropout mask, with and without dropout, fp32 and bf16."""
import pytest
import torch
from torch import nn

from qforge.nn import LoraSpec
from qforge.nn.dropout import hash_dropout
from qforge.nn.lora import LoraAdapter, LowRankFunction


def composed(adapter, x):
    """What low_rank computed before the fusion: dropout, Linear A, Linear B, then the scaling."""
    x = x.to(adapter.lora_A.weight.dtype)
    xd = hash_dropout(x, adapter.dropout.p, adapter.training) if adapter.spec.dropout > 0 else x
    return adapter.lora_B(adapter.lora_A(xd)) * adapter.scaling


def run(adapter, x, g, fn):
    for p in adapter.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(11)  # the dropout seed comes from torch's generator, as in the layer
    y = fn(adapter, x)
    y.backward(g)
    return y.detach(), x.grad, adapter.lora_A.weight.grad, adapter.lora_B.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("alpha", [16.0, 7.0])  # scaling 2 (exact in any order) and 0.875
def test_fused_equals_composed(dtype, dropout, alpha):
    """float32: equal to the composed form within 1e-5. bfloat16 rounds at other places (the
    scaling lands on the (rows, r) product, not the (rows, out) one), so both are held against a
    float64 run of the composed form: the fused error is at most 1.5x the composed error plus
    1e-3 of the largest value."""
    torch.manual_seed(0)
    adapter = LoraAdapter(48, 40, LoraSpec(r=8, alpha=alpha, dropout=dropout, dtype=dtype))
    nn.init.normal_(adapter.lora_B.weight, std=0.2)
    adapter.train()
    x = torch.randn(3, 7, 48, dtype=dtype)
    g = torch.randn(3, 7, 40, dtype=dtype)
    calls = []
    original = LowRankFunction.apply
    LowRankFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fused = run(adapter, x, g, lambda a, inp: a.low_rank(inp))
    finally:
        LowRankFunction.apply = original
    assert calls, "low_rank did not take the fused path on the CPU"
    reference = run(adapter, x, g, composed)
    exact = LoraAdapter(48, 40, LoraSpec(r=8, alpha=alpha, dropout=dropout, dtype=torch.float64))
    exact.load_state_dict({k: v.double() for k, v in adapter.state_dict().items()})
    exact.train()
    truth = run(exact, x.double(), g.double(), composed)
    for got, want, true, what in zip(fused, reference, truth, ("output", "grad x", "grad A", "grad B")):
        assert got.dtype == want.dtype == dtype, what
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)
        else:
            err, ref_err = (got.double() - true).abs().max(), (want.double() - true).abs().max()
            assert err <= 1.5 * ref_err + 1e-3 * true.abs().max(), (what, float(err), float(ref_err))
    if dropout:  # the mask matters: with it on, some rows of x's gradient lose entries
        assert (fused[1] == 0).sum() > 0


def test_eval_mode_and_no_grad_take_the_composed_path_without_dropout():
    torch.manual_seed(0)
    adapter = LoraAdapter(16, 12, LoraSpec(r=4, dropout=0.5, dtype=torch.float32))
    nn.init.normal_(adapter.lora_B.weight, std=0.2)
    adapter.eval()
    x = torch.randn(5, 16)
    want = adapter.lora_B(adapter.lora_A(x)) * adapter.scaling
    torch.testing.assert_close(adapter.low_rank(x), want)              # eval: no dropout, fused
    with torch.no_grad():
        torch.testing.assert_close(adapter.low_rank(x), want)
