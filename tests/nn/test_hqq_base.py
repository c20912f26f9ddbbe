"""HQQBase: the HQQ codes as an AdaptedLinear's frozen base. Its product is x @ hqq_dequantize(W)^T
exactly, dL/dx is the dense product's, its state dict is the `hqq` package's keys, and LoRA on it
equals LoRA on the dequantised weight held dense."""
import pytest
import torch
from torch import nn

from qforge.nn import AdaptedLinear, DenseBase, HQQBase, LoraSpec, quantized_base
from qforge.quant.hqq import hqq_dequantize, hqq_quantize


def linear(seed=0, bias=True, out=64, inp=128):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_equal_the_dequantised_dense_product(bits, dtype):
    lin = linear()
    layer = AdaptedLinear.quantized(lin, f"hqq{bits}", 64, compute_dtype=dtype)
    w = hqq_dequantize(layer.base.hqq_state, dtype)                     # [out, in]
    x = torch.randn(2, 5, 128, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    assert torch.equal(y, x @ w.T + layer.bias)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ((x2 @ w.T) * g).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_codes_are_the_quantisers_and_the_scales_are_float16():
    lin = linear(bias=False)
    base = HQQBase.from_weight(lin.weight, 3, 32)
    ref = hqq_quantize(lin.weight.detach(), 3, 32)
    assert torch.equal(base.hqq_state.packed, ref.packed)
    assert base.hqq_state.scale.dtype == torch.float16 and base.hqq_state.zero.dtype == torch.float16
    assert torch.equal(base.hqq_state.scale, ref.scale.half()) and torch.equal(base.hqq_state.zero, ref.zero.half())
    assert base.kind == "hqq3" and "group_size=32" in base.describe()
    assert isinstance(quantized_base(lin.weight, "hqq2", 64), HQQBase)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_state_dict_is_the_hqq_layout_and_round_trips_bit_identically(bits):
    layer = AdaptedLinear.quantized(linear(1), f"hqq{bits}", 64, compute_dtype=torch.float32)
    sd = layer.state_dict()
    assert {"W_q", "scale", "zero", "nbits", "group_size", "shape", "axis", "bias"} <= set(sd)
    assert "weight" not in sd and int(sd["nbits"]) == bits
    fresh = AdaptedLinear.quantized(linear(2), f"hqq{bits}", 64, compute_dtype=torch.float32)
    fresh.load_state_dict(sd)
    for a, b in ((fresh.base.hqq_state.packed, layer.base.hqq_state.packed), (fresh.weight, layer.weight),
                 (fresh.base.hqq_state.scale, layer.base.hqq_state.scale), (fresh.bias, layer.bias)):
        assert torch.equal(a, b)
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_a_bad_state_dict_is_an_error_naming_the_key():
    layer = AdaptedLinear.quantized(linear(), "hqq4", 64, compute_dtype=torch.float32)
    sd = layer.state_dict()
    small = AdaptedLinear.quantized(linear(out=32), "hqq4", 64, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"W_q: shape \[64, 128\] does not fit \[32, 128\]"):
        small.load_state_dict(sd)
    del sd["zero"]
    with pytest.raises(RuntimeError, match="missing key 'zero'"):
        AdaptedLinear.quantized(linear(), "hqq4", 64).load_state_dict(sd)


def test_lora_on_hqq_equals_lora_on_the_dequantised_weight_held_dense():
    lin = linear(3)
    spec = LoraSpec(r=4, alpha=8, dropout=0.0, dtype=torch.float32)
    hqq = AdaptedLinear.quantized(lin, "hqq3", 64, compute_dtype=torch.float32)
    dense = AdaptedLinear(DenseBase(hqq.dequantized(torch.float32)), lin.bias, torch.float32)
    for layer in (hqq, dense):
        torch.manual_seed(5)
        layer.add_adapter("a", spec)
        with torch.no_grad():
            layer.adapters["a"].lora_B.weight.normal_()
    x = torch.randn(4, 128)
    y_h, y_d = hqq(x), dense(x)
    torch.testing.assert_close(y_h, y_d, rtol=1e-5, atol=1e-5)
    y_h.square().sum().backward()
    y_d.square().sum().backward()
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(hqq.adapters["a"], name).weight.grad,
                                   getattr(dense.adapters["a"], name).weight.grad, rtol=1e-4, atol=1e-4)


def test_moving_the_layer_moves_codes_scales_and_zeros(device):
    layer = AdaptedLinear.quantized(linear(), "hqq4", 64, compute_dtype=torch.float32).to(device)
    st = layer.base.hqq_state
    assert st.packed.device.type == st.scale.device.type == st.zero.device.type == torch.device(device).type
    x = torch.randn(2, 128, device=device)
    torch.testing.assert_close(layer(x), x @ hqq_dequantize(st, torch.float32).T + layer.bias)


@pytest.mark.parametrize("make, message", [
    (lambda: HQQBase.from_weight(linear().weight, 5, 64), "bits must be 4, 3 or 2, got 5"),
    (lambda: AdaptedLinear.quantized(linear(inp=96, out=5), "hqq4", 64), r"group size 64 does not divide the 480 values"),
    (lambda: AdaptedLinear.quantized(linear(), "hqq8"), "HQQ is offered at hqq4, hqq3, hqq2"),
    (lambda: AdaptedLinear.quantized(linear(), "hqq4", 0), "group size 0 does not divide"),
])
def test_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
