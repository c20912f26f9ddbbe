"""Triton fused dequantise-and-multiply against F.linear on the dequantised weight.

The reference is computed in float32 from the same rounded inputs (x and dequantize(state, dtype)),
so the only differences are summation order and the rounding of the output: TOLERANCE in conftest.
"""
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from qforge.kernels import triton_matmul as tm  # noqa: E402
from qforge.quant import dequantize, quantize  # noqa: E402

from .conftest import TOLERANCE, max_rel_error  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(80, 96), (33, 130)]  # (out, in): 130 and 33 are not multiples of any tile or block
QUANTS = [("nf4", True, 64), ("fp4", False, 32), ("nf4", False, 128), ("fp4", True, 4096)]


def _state(out_features, in_features, quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    quant_type, double_quant, blocksize = quant
    return quantize(torch.randn(out_features, in_features, generator=g) * 0.1, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q[0]}-dq{int(q[1])}-bs{q[2]}")
@pytest.mark.parametrize("out_in", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("M", [1, 3, 17, 70])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qmatmul_both_orientations(device, dtype, M, out_in, quant):
    """x @ W^T (forward) and g @ W (input gradient) for decode-sized and training-sized M."""
    state = _state(*out_in, quant)
    w = dequantize(state, dtype).float()  # [out, in]
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, out_in[1], generator=g).to(dtype)
    grad = torch.randn(M, out_in[0], generator=g).to(dtype)
    dev_state = state.to(device)
    y = tm.qmatmul(x.to(device), dev_state, trans_w=True)
    assert y.shape == (M, out_in[0]) and y.dtype == dtype
    assert max_rel_error(y, F.linear(x.float(), w)) <= TOLERANCE[dtype]
    dx = tm.qmatmul(grad.to(device), dev_state, trans_w=False)
    assert dx.shape == (M, out_in[1]) and dx.dtype == dtype
    assert max_rel_error(dx, grad.float() @ w) <= TOLERANCE[dtype]


def test_linear_4bit_keeps_leading_dims(device):
    state = _state(33, 130, ("nf4", True, 64))
    x = torch.randn(2, 5, 130, dtype=torch.bfloat16)
    y = tm.linear_4bit(x.to(device), state.to(device))
    assert y.shape == (2, 5, 33)
    ref = F.linear(x.float(), dequantize(state, torch.bfloat16).float())
    assert max_rel_error(y, ref) <= TOLERANCE[torch.bfloat16]


def test_strided_input(device):
    """A transposed (non-contiguous) x is read through its strides."""
    state = _state(80, 96, ("nf4", True, 64))
    x = torch.randn(96, 17, dtype=torch.float16).t()
    y = tm.qmatmul(x.to(device), state.to(device))
    assert max_rel_error(y, F.linear(x.float(), dequantize(state, torch.float16).float())) <= TOLERANCE[torch.float16]


def test_non_power_of_two_blocksize_falls_back(device):
    """A blocksize the kernel cannot index by shifting takes dequantise + torch matmul."""
    state = _state(8, 96, ("nf4", False, 64))
    from qforge.kernels import reference
    from qforge.quant.codebooks import BOUNDS_4BIT
    w = torch.randn(8, 96)
    packed, absmax = reference.quantize_4bit(w, 48, *BOUNDS_4BIT["nf4"])
    odd = types.SimpleNamespace(packed=packed.to(device), absmax=absmax.to(device), shape=torch.Size([8, 96]),
                                blocksize=48, code=state.code.to(device), nested_absmax=None)
    x = torch.randn(3, 96)
    dense = reference.dequantize_4bit(packed, absmax, state.code, 768, 48, torch.float32).view(8, 96)
    y = tm.qmatmul(x.to(device), odd)
    assert max_rel_error(y, x @ dense.t()) <= TOLERANCE[torch.float32]


def test_rejects_wrong_width(device):
    state = _state(8, 96, ("nf4", True, 64)).to(device)
    with pytest.raises(ValueError, match="does not fit"):
        tm.qmatmul(torch.randn(2, 95, device=device), state)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dequantize-then-matmul"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_paths_for_many_rows(device, dtype, fused):
    """M above FUSED_MAX_M: the fused kernel (forced) and the dequantise + matmul path agree with torch."""
    M = tm.FUSED_MAX_M + 3
    state = _state(33, 130, ("nf4", True, 64))
    w = dequantize(state, dtype).float()
    x = torch.randn(M, 130, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = tm.qmatmul(x.to(device), state.to(device), fused=fused)
    assert max_rel_error(y, F.linear(x.float(), w)) <= TOLERANCE[dtype]
