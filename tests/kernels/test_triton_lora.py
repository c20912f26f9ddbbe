"""Triton LoRA kernels: the fused 4-bit LoRA layer (forward and every gradient) and the gathered
multi-adapter delta, against explicit float32 torch math on the same rounded inputs."""
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from qforge.kernels import triton_lora as tl_lora  # noqa: E402
from qforge.nn import AdaptedLinear, LoraSpec, Quant4bitBase  # noqa: E402
from qforge.quant import dequantize, quantize  # noqa: E402

from .conftest import TOLERANCE, max_rel_error  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYERS = [(80, 96, 8), (33, 130, 5)]  # (out, in, r): r = 5 is padded to a 16-wide tile


def _inputs(out_features, in_features, r, M, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = quantize(torch.randn(out_features, in_features, generator=g) * 0.1, "nf4", 64, True)
    x = torch.randn(M, in_features, generator=g).to(dtype)
    A = (torch.randn(r, in_features, generator=g) * 0.1).to(dtype)
    B = (torch.randn(out_features, r, generator=g) * 0.1).to(dtype)
    grad = torch.randn(M, out_features, generator=g).to(dtype)
    return state, x, A, B, grad


def _torch_lora(state, x, A, B, s, grad, dtype):
    """y = x W^T + s (x A^T) B^T in float32 autograd; returns y and the gradients of x, A, B."""
    w = dequantize(state, dtype).float()
    x, A, B = (t.detach().float().requires_grad_() for t in (x, A, B))
    y = x @ w.t() + s * (x @ A.t()) @ B.t()
    y.backward(grad.float())
    return y.detach(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("layer", LAYERS, ids=lambda s: f"{s[0]}x{s[1]}r{s[2]}")
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_lora_forward_and_gradients(device, dtype, M, layer):
    state, x, A, B, grad = _inputs(*layer, M, dtype)
    s = 2.0
    xd, Ad, Bd = (t.to(device).requires_grad_() for t in (x, A, B))
    y = tl_lora.lora_linear_4bit(xd, state.to(device), Ad, Bd, s)
    y.backward(grad.to(device))
    ref = _torch_lora(state, x, A, B, s, grad, dtype)
    for name, got, want in zip(("y", "dx", "dA", "dB"), (y, xd.grad, Ad.grad, Bd.grad), ref):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert max_rel_error(got, want) <= TOLERANCE[dtype], name


def test_fused_lora_saves_no_dense_weight(device):
    """Only x, A and B are saved for backward: nothing of the weight's [out, in] size."""
    out_features, in_features, r = 80, 96, 8
    state, x, A, B, grad = _inputs(out_features, in_features, r, 3, torch.bfloat16)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    xd, Ad, Bd = (t.to(device).requires_grad_() for t in (x, A, B))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tl_lora.lora_linear_4bit(xd, state.to(device), Ad, Bd, 2.0)
    y.backward(grad.to(device))
    assert saved, "the hook saw nothing: the test would pass vacuously"
    assert all(shape[-2:] != (out_features, in_features) for shape, _ in saved), saved
    assert all(torch.Size(shape).numel() < out_features * in_features for shape, _ in saved), saved
    assert Ad.grad is not None and xd.grad is not None


def test_fused_lora_matches_qlora_linear(device):
    """The fused path against the module it would replace: AdaptedLinear, one adapter, bf16, no dropout."""
    torch.manual_seed(0)
    layer = AdaptedLinear.quantized(nn.Linear(130, 33, bias=False))
    adapter = layer.add_adapter("a", LoraSpec(r=8, alpha=16, dropout=0.0))
    nn.init.normal_(adapter.lora_B.weight, std=0.1)
    x = torch.randn(2, 3, 130, dtype=torch.bfloat16)
    grad = torch.randn(2, 3, 33, dtype=torch.bfloat16)
    xr = x.clone().requires_grad_()
    layer(xr).backward(grad)
    A = adapter.lora_A.weight.detach().to(device).requires_grad_()
    B = adapter.lora_B.weight.detach().to(device).requires_grad_()
    xd = x.to(device).requires_grad_()
    y = tl_lora.lora_linear_4bit(xd, layer.base.quant_state.to(device), A, B, adapter.scaling)
    y.backward(grad.to(device))
    tol = 2 * TOLERANCE[torch.bfloat16]  # the module also rounds its intermediates to bf16
    assert max_rel_error(y, layer(x).detach()) <= tol
    assert max_rel_error(xd.grad, xr.grad) <= tol
    assert max_rel_error(A.grad, adapter.lora_A.weight.grad) <= tol
    assert max_rel_error(B.grad, adapter.lora_B.weight.grad) <= tol


def _gathered_loop(x, A, B, slots, scalings):
    """delta[b] = s[k] (x[b] A[k]^T) B[k]^T in float32, zero where k = slots[b] is K."""
    x3 = x.float() if x.dim() == 3 else x.float().unsqueeze(1)
    delta = torch.zeros(*x3.shape[:2], B.shape[1])
    for b, k in enumerate(slots.tolist()):
        if k < A.shape[0]:
            delta[b] = scalings[k] * (x3[b] @ A[k].float().t()) @ B[k].float().t()
    return delta if x.dim() == 3 else delta.squeeze(1)


@pytest.mark.parametrize("rows_shape", [(6, 5), (6,)], ids=["BxT", "B"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gathered_lora_matches_loop(device, dtype, rows_shape):
    K, r, n_in, n_out = 3, 5, 130, 33
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*rows_shape, n_in, generator=g).to(dtype)
    A = (torch.randn(K, r, n_in, generator=g) * 0.1).to(dtype)
    B = (torch.randn(K, n_out, r, generator=g) * 0.1).to(dtype)
    slots = torch.tensor([0, K, 2, 1, 0, K])
    scalings = torch.tensor([0.5, 2.0, 1.0])
    got = tl_lora.gathered_lora(x.to(device), A.to(device), B.to(device), slots.to(device), scalings.to(device))
    want = _gathered_loop(x, A, B, slots, scalings)
    assert got.shape == want.shape and got.dtype == dtype
    assert max_rel_error(got, want) <= TOLERANCE[dtype]
    assert not got[1].any() and not got[5].any()  # "no adapter" rows are exactly zero


def test_gathered_lora_matches_qlora_mixed_batch(device):
    """Same numbers as each row's adapter made active on the layer (ranks 4 and 8 stacked, zero-padded)."""
    torch.manual_seed(0)
    state = quantize(torch.randn(33, 96) * 0.1, "nf4", 64, True)
    layer = AdaptedLinear(Quant4bitBase(state), None, compute_dtype=torch.float32)
    adapters = [layer.add_adapter(n, LoraSpec(r=r, alpha=a, dropout=0.0, dtype=torch.float32))
                for n, r, a in (("p", 4, 8.0), ("q", 8, 4.0))]
    for a in adapters:
        nn.init.normal_(a.lora_B.weight, std=0.1)
    x = torch.randn(4, 3, 96)
    with torch.no_grad():
        layer.active_adapter = None
        base = layer(x)
        rows = []
        for b, name in enumerate(["p", None, "q", "p"]):
            layer.active_adapter = name
            rows.append(layer(x[b:b + 1])[0] - base[b])
        want = torch.stack(rows)
    A = torch.zeros(2, 8, 96)
    B = torch.zeros(2, 33, 8)
    for k, a in enumerate(adapters):
        A[k, :a.r], B[k, :, :a.r] = a.lora_A.weight.detach(), a.lora_B.weight.detach()
    scalings = torch.tensor([a.scaling for a in adapters])
    got = tl_lora.gathered_lora(x.to(device), A.to(device), B.to(device), torch.tensor([0, 2, 1, 0]).to(device),
                                scalings.to(device))
    assert max_rel_error(got, want) <= 1e-4  # float32; `want` is a difference of two outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_lora_many_rows_takes_the_dequantize_path(device, dtype):
    """Above FUSED_MAX_M rows the layer dequantises W transiently and uses cuBLAS: same numbers,
    and still nothing of W's size is saved for backward."""
    from qforge.kernels.triton_matmul import FUSED_MAX_M
    state, x, A, B, grad = _inputs(33, 130, 5, FUSED_MAX_M + 7, dtype)
    saved = []
    xd, Ad, Bd = (t.to(device).requires_grad_() for t in (x, A, B))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = tl_lora.lora_linear_4bit(xd, state.to(device), Ad, Bd, 0.5)
    y.backward(grad.to(device))
    assert all(torch.Size(s).numel() != 33 * 130 for s in saved)
    for got, want in zip((y, xd.grad, Ad.grad, Bd.grad), _torch_lora(state, x, A, B, 0.5, grad, dtype)):
        assert max_rel_error(got, want) <= TOLERANCE[dtype]
