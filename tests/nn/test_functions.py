"""The one frozen-product Function (qforge.nn.functions.FrozenProduct) under every base: 4-bit, dense,
sharded 4-bit, HQQ and both expert banks. Its forward is x @ W^T and its backward dL/dy @ W for the
W the base dequantises (float32 compute: the same products as F.linear on that W, to float32
summation order), it saves no tensor for backward, and W gets no gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qforge.nn import AdaptedLinear
from qforge.nn.experts import DenseExpertBank, ExpertBank
from qforge.nn.functions import FrozenProduct


def linear_base(kind: str):
    """(product function, W [out, in] float32) of an AdaptedLinear's base of `kind`."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64, bias=False)
    if kind == "dense":
        layer = AdaptedLinear.dense(linear, torch.float32)
    else:
        layer = AdaptedLinear.quantized(linear, "hqq4" if kind == "hqq" else "nf4", 64, compute_dtype=torch.float32)
        if kind == "sharded":
            layer.set_base(layer.base.to_sharded(torch.float32))
    return layer.base.product, layer.dequantized(torch.float32)


def expert_bank(kind: str):
    """(product of expert 1, W[1] float32) of a 3-expert bank [3, 64, 128]."""
    weight = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    bank = ExpertBank.quantize(weight) if kind == "experts4bit" else DenseExpertBank(weight)
    return (lambda x: bank.product(x, 1)), bank.dequantized(torch.float32)[1]


@pytest.mark.parametrize("kind", ["nf4", "dense", "sharded", "hqq", "experts4bit", "experts_dense"])
def test_every_base_multiplies_through_the_one_frozen_product(kind):
    product, w = expert_bank(kind) if kind.startswith("experts") else linear_base(kind)
    x = torch.randn(5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = product(x)
    assert type(y.grad_fn).__name__ == FrozenProduct.__name__ + "Backward"
    assert saved == []  # backward makes W again: nothing kept between the two
    g = torch.randn_like(y)
    y.backward(g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # float32 sums of 128 terms, other order
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)  # 64 terms
