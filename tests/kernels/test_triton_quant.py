"""Triton 4-bit quantisation (the device path of streaming loads, `qforge quantize --device cuda`):
bit-exact with the torch reference, with qforge.quant's CPU result (double quantisation included)
and with bitsandbytes."""
import pytest
import torch

pytest.importorskip("triton")

import bitsandbytes.functional as bnbF  # noqa: E402

from qforge.kernels import dispatch, reference  # noqa: E402
from qforge.kernels import triton_quant as tq  # noqa: E402
from qforge.quant import quantize  # noqa: E402
from qforge.quant.codebooks import BOUNDS_4BIT  # noqa: E402


def _weight(rows=97, cols=131, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Odd element count (a partial last block, a padded last byte); row scales over e^+-6; one
    all-zero block (absmax 0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))
    w.view(-1)[:64] = 0
    return w.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_bit_exact_with_the_reference(device, quant_type, blocksize, dtype):
    w = _weight(dtype=dtype)
    bounds, order = BOUNDS_4BIT[quant_type]
    packed, absmax = tq.quantize_4bit(w.to(device), blocksize, bounds, order)
    ref_packed, ref_absmax = reference.quantize_4bit(w, blocksize, bounds, order)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu().view(torch.int32), ref_absmax.view(torch.int32))


@pytest.mark.parametrize("n", [1, 2, 3, 65, 4096 * 2 + 1])
def test_kernel_tiny_and_odd_lengths(device, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    bounds, order = BOUNDS_4BIT["nf4"]
    packed, absmax = tq.quantize_4bit(x.to(device), 64, bounds, order)
    ref_packed, ref_absmax = reference.quantize_4bit(x, 64, bounds, order)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)


@pytest.fixture
def triton_route(device, monkeypatch):
    """qforge.quant.quantize on `device` as dispatch routes it there: under the interpreter the CPU
    tensors are sent down the CUDA route (Triton for the 4-bit codes, torch ops for the rest)."""
    if torch.device(device).type == "cpu":
        monkeypatch.setattr(dispatch, "_native_ok", lambda *t: False)
        monkeypatch.setattr(dispatch, "use_triton", lambda *t: True)
    calls = []
    real = tq.quantize_4bit
    monkeypatch.setattr(tq, "quantize_4bit", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_on_the_device_equals_the_cpu_path_and_bitsandbytes(device, triton_route, quant_type, double_quant):
    w = _weight(64, 320, dtype=torch.bfloat16)
    cpu_state = quantize(w, quant_type, 64, double_quant)
    dev_state = quantize(w.to(device), quant_type, 64, double_quant)
    assert triton_route, "the Triton kernel was not the path taken"
    assert dev_state.packed.device.type == torch.device(device).type
    for name in ("packed", "absmax", "code", "nested_absmax", "nested_code"):
        a, b = getattr(dev_state, name), getattr(cpu_state, name)
        assert (a is None and b is None) or torch.equal(a.cpu(), b), name
    assert dev_state.offset == cpu_state.offset
    packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    assert torch.equal(dev_state.packed.cpu(), packed) and torch.equal(dev_state.absmax.cpu(), st.absmax)
    if double_quant:
        assert torch.equal(dev_state.nested_absmax.cpu(), st.state2.absmax) and dev_state.offset == st.offset.item()
