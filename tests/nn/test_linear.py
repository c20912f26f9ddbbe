"""AdaptedLinear (4-bit base) against plain LoRA on the dequantised weight (the torchtune parity test),
DoRA against its formula, and bitsandbytes keys. (Mixed-adapter batches: tests/serve/test_lora_slots.py.)"""
import copy

import pytest
import torch
from torch import nn

from qforge.nn import AdaptedLinear, LoraSpec, Quant4bitBase
from qforge.quant import dequantize


def make_layer(in_f=96, out_f=80, bias=True, dtype=torch.float32, seed=0, device="cpu", **spec):
    """Built (and quantised) on the CPU, then moved to `device`: the same layer on every device."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = AdaptedLinear.quantized(lin, compute_dtype=dtype)
    spec = LoraSpec(**{"r": 8, "alpha": 16, "dropout": 0.0, "dtype": dtype, **spec})
    adapter = layer.add_adapter("a", spec)
    nn.init.normal_(adapter.lora_B.weight, std=0.1)  # non-zero B so the adapter matters
    return layer.to(device)


def reference_lora(layer, name, x):
    """Plain LoRA on an ordinary nn.Linear holding the dequantised weight."""
    a = layer.adapters[name]
    w = layer.dequantized(layer.compute_dtype)
    y = x @ w.T + (x @ a.lora_A.weight.T) @ a.lora_B.weight.T * a.scaling
    return y + layer.bias if layer.bias is not None else y


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_backward_equal_lora_on_the_dequantised_weight(use_rslora, device):
    layer = make_layer(use_rslora=use_rslora, device=device)
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 5, 96).to(device).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), reference_lora(ref, "a", x_ref)
    assert y.device.type == torch.device(device).type
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer.adapters["a"], p).weight.grad,
                                   getattr(ref.adapters["a"], p).weight.grad, rtol=1e-5, atol=1e-5)
    assert layer.adapters["a"].scaling == (16 / 8 ** 0.5 if use_rslora else 2.0)


def test_bf16_compute_is_close_to_fp32(device):
    layer = make_layer(dtype=torch.bfloat16, device=device)
    x = torch.randn(4, 96).to(device)
    y = layer(x)
    assert y.dtype == torch.float32  # returns the input's dtype
    ref = reference_lora(layer, "a", x.to(torch.bfloat16)).float()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


def test_base_is_frozen_and_backward_keeps_no_dequantised_weight():
    layer = make_layer(in_f=512, out_f=512)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.a.lora_A.weight",
                                                                          "adapters.a.lora_B.weight"]
    saved = []
    x = torch.randn(2, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    # LoRA saves x, A(x) and the adapter weights; never a dense [512, 512] weight
    assert max(saved) < 512 * 512
    y.sum().backward()
    assert layer.weight.grad is None and layer.weight.dtype == torch.uint8


def test_dora_matches_its_formula(device):
    layer = make_layer(use_dora=True, device=device)
    a = layer.adapters["a"]
    with torch.no_grad():
        a.magnitude.mul_(torch.linspace(0.5, 1.5, 80, device=device))
    x = torch.randn(6, 96).to(device)
    w0 = dequantize(layer.base.quant_state, torch.float32)
    merged = w0 + a.scaling * a.lora_B.weight @ a.lora_A.weight
    w_dora = a.magnitude[:, None] * merged / merged.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w_dora.T + layer.bias, rtol=1e-5, atol=1e-5)
    # magnitude starts as the row norms of the dequantised base: a fresh DoRA layer equals the base
    fresh = make_layer(use_dora=True, device=device)
    nn.init.zeros_(fresh.adapters["a"].lora_B.weight)
    fresh_base = x @ fresh.dequantized(torch.float32).T + fresh.bias
    torch.testing.assert_close(fresh(x), fresh_base, rtol=1e-5, atol=1e-5)


def test_state_dict_uses_bitsandbytes_keys_and_round_trips():
    layer = make_layer()
    sd = layer.state_dict()
    for k in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
              "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"):
        assert k in sd, k
    other = make_layer(seed=1)
    other.load_state_dict(sd)
    x = torch.randn(3, 96)
    torch.testing.assert_close(other(x), layer(x))
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:-1]})
    with pytest.raises(RuntimeError, match="weight.absmax"):
        make_layer(seed=2).load_state_dict(bad)


def test_bf16_lora_layer_matches_qlora_on_the_same_dequantised_weight(device):
    """A dense base and a 4-bit base differ only in the base product."""
    from qforge.nn import DenseBase
    q = make_layer(use_dora=True, device=device)
    dense = AdaptedLinear(DenseBase(q.dequantized(torch.float32)), q.bias, torch.float32)
    dense.add_adapter("a", LoraSpec(r=8, alpha=16, dropout=0.0, dtype=torch.float32, use_dora=True))
    dense = dense.to(device)
    dense.adapters["a"].load_state_dict(q.adapters["a"].state_dict())
    x = torch.randn(4, 96).to(device)
    torch.testing.assert_close(dense(x), q(x), rtol=1e-5, atol=1e-5)
    assert set(dense.state_dict()) >= {"weight", "bias"} and "weight.absmax" not in dense.state_dict()


def test_moving_the_layer_moves_its_base_and_keeps_its_result(device):
    """layer.to(device) carries the 4-bit state (codes, absmax, nested scales, code books) along;
    the product on the device equals the CPU's."""
    cpu_layer = make_layer()
    layer = make_layer(device=device)
    st = layer.base.quant_state
    for t in (st.packed, st.absmax, st.code, st.nested_absmax, st.nested_code):
        assert t.device.type == torch.device(device).type
    assert layer.weight is st.packed
    x = torch.randn(4, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x.to(device)).cpu(), cpu_layer(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.dequantized(torch.float32).cpu(), cpu_layer.dequantized(torch.float32),
                                   rtol=0, atol=0)


def test_float32_adapters_compute_in_bf16_and_keep_small_updates():
    """Float32 adapter weights (the default, as PEFT's) run their products in the layer's BF16, so
    forward and gradients equal those of BF16 weights holding the same (rounded) values, and the
    gradients arrive in float32; an update below half a BF16 ulp is kept, where BF16 weights lose it."""
    assert LoraSpec().dtype == torch.float32
    torch.manual_seed(3)
    fp32 = AdaptedLinear.quantized(nn.Linear(96, 80), compute_dtype=torch.bfloat16)
    nn.init.normal_(fp32.add_adapter("a", LoraSpec(r=8, alpha=16, dropout=0.0)).lora_B.weight, std=0.1)
    bf16 = copy.deepcopy(fp32)
    a32, a16 = fp32.adapters["a"], bf16.adapters["a"]
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):  # BF16 twins of the float32 weights, rounded once
            w = getattr(a32, name).weight
            w.copy_(w.to(torch.bfloat16).float())
            getattr(a16, name).weight = nn.Parameter(w.to(torch.bfloat16))
    x = torch.randn(2, 7, 96, dtype=torch.bfloat16)
    y32, y16 = fp32(x), bf16(x)
    assert y32.dtype == y16.dtype == torch.bfloat16
    assert torch.equal(y32, y16)
    g = torch.randn_like(y32)
    y32.backward(g)
    y16.backward(g)
    for name in ("lora_A", "lora_B"):
        g32, g16 = getattr(a32, name).weight.grad, getattr(a16, name).weight.grad
        assert g32.dtype == torch.float32 and g16.dtype == torch.bfloat16
        assert torch.equal(g32, g16.float())
    # 1e-4 on entries of about 0.1 (a BF16 ulp there is 2^-10 ~ 9.8e-4): float32 keeps every one
    with torch.no_grad():
        w32, w16 = a32.lora_A.weight, a16.lora_A.weight
        w32.fill_(0.1)
        w16.fill_(0.1)
        w32.add_(1e-4)
        w16.add_(1e-4)
    assert bool((w32 != torch.tensor(0.1)).all()) and bool((w16 == torch.tensor(0.1, dtype=torch.bfloat16)).all())


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_deep_copied_layer_computes_the_same_bits(use_dora):
    """Variants are asked, never identified: a deep copy (its variant object a copy too) takes the
    same path and gives the same bits under BF16 autocast (a copied LoRA variant that failed an
    identity test would leave the addmm path for another rounding)."""
    layer = make_layer(dtype=torch.bfloat16, use_dora=use_dora)
    twin = copy.deepcopy(layer)
    assert twin.adapters["a"].variant is not layer.adapters["a"].variant
    x = torch.randn(2, 7, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(twin(x), layer(x))
