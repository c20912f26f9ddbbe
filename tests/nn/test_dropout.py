"""Counter-based dropout (qforge.nn.dropout): the native kernel and the torch reference give the
same bits, the keep rate is 1 - p, backward uses the forward's mask, seeding and gradient
checkpointing reproduce it, and LoRA training uses it."""
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from qforge.kernels import cpu, reference
from qforge.nn import LoraSpec
from qforge.nn.dropout import HashDropout, hash_dropout

native = pytest.mark.skipif(cpu.load() is None, reason="no C compiler: the native kernel is not built")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 65537, 300001])
def test_native_kernel_equals_reference_bit_for_bit(dtype, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) * 30
    x[::97] = float("inf")
    x[1::101] = float("nan")
    for p in (0.05, 0.5, 0.9):
        threshold, scale = math.ceil(p * 2**24), 1 / (1 - p)
        for seed in (0, 1, 2**40 + 12345, 2**63 - 2):
            a, b = cpu.dropout(x, threshold, scale, seed), reference.dropout(x, threshold, scale, seed)
            assert torch.equal(a.isnan(), b.isnan())  # NaN payloads may differ; every other bit may not
            bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
            assert torch.equal(a[~a.isnan()].view(bits), b[~b.isnan()].view(bits))


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_rate_and_scale(p):
    n = 1_000_000
    keep = reference.dropout_keep(n, math.ceil(p * 2**24), seed=7)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # five standard deviations
    torch.manual_seed(0)
    y = hash_dropout(torch.ones(n), p)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    # neighbouring elements are not correlated: P(both kept) ~ (1 - p)^2
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.005


def test_backward_uses_the_forward_mask_and_seeds_reproduce():
    x = torch.randn(3, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    y = hash_dropout(x, 0.2)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y.detach() != 0)
    torch.manual_seed(1)
    assert torch.equal(hash_dropout(x, 0.2), y)
    assert not torch.equal(hash_dropout(x, 0.2), y)  # the next draw differs
    assert hash_dropout(x, 0.2, training=False) is x and hash_dropout(x, 0.0) is x


def test_checkpoint_recomputation_sees_the_same_mask():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64)

    def block(inp):
        return torch.tanh(hash_dropout(inp, 0.3) @ w)

    torch.manual_seed(3)
    block(x).square().sum().backward()
    plain = w.grad.clone()
    w.grad = None
    torch.manual_seed(3)
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    assert torch.equal(w.grad, plain)


def test_lora_adapter_uses_hash_dropout():
    from qforge.nn.lora import LoraAdapter
    adapter = LoraAdapter(32, 16, LoraSpec(r=4, dropout=0.1, dtype=torch.float32))
    assert isinstance(adapter.dropout, HashDropout) and adapter.dropout.p == 0.1
    with pytest.raises(ValueError, match="dropout probability"):
        HashDropout(1.0)
