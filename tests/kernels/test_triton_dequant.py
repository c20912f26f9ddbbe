"""Triton dequantisation: bit-exact with the pure-torch oracle for every format and blocksize."""
import types

import pytest
import torch

pytest.importorskip("triton")

from qforge.kernels import dispatch, reference  # noqa: E402
from qforge.kernels import triton_dequant as td  # noqa: E402
from qforge.quant import NF4_LEVELS, block_absmax, quantize  # noqa: E402
from qforge.quant.codebooks import BOUNDS_4BIT  # noqa: E402

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _weight(rows=97, cols=131, seed=0) -> torch.Tensor:
    """Odd element count (blocks straddle rows, a partial last block); row scales spread over e^+-6
    so blocks' absmax differ widely and fp16 meets subnormals."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(2 * torch.randn(rows, 1, generator=g))


def _oracle(state, dtype):
    return reference.dequantize_4bit(state.packed, block_absmax(state), state.code, state.numel,
                                     state.blocksize, dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_bit_exact(device, blocksize, quant_type, double_quant):
    state = quantize(_weight(), quant_type, blocksize, double_quant)
    for dtype in DTYPES:
        got = td.dequantize_state(state.to(device), dtype)
        assert got.shape == state.shape and got.dtype == dtype
        assert torch.equal(_bits(got.reshape(-1)), _bits(_oracle(state, dtype))), (dtype, blocksize)


@pytest.mark.parametrize("n", [1, 2, 3, 65, 257])
def test_dequantize_tiny_and_odd_lengths(device, n):
    state = quantize(torch.randn(n), "nf4", 64, True)
    got = td.dequantize_4bit(state.packed.to(device), td.state_absmax(state.to(device)),
                             state.code.to(device), n, 64, torch.bfloat16)
    assert torch.equal(_bits(got), _bits(_oracle(state, torch.bfloat16)))


def test_dequantize_into_out_buffer(device):
    state = quantize(_weight(40, 50), "nf4", 64, True).to(device)
    out = torch.full((40 * 50,), float("nan"), dtype=torch.float16, device=device)
    got = td.dequantize_state(state, torch.float16, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(_bits(out), _bits(_oracle(state.to("cpu"), torch.float16)))


def test_absmax_kernel_is_multiply_then_add(device):
    """The rebuilt absmax equals block_absmax to the bit, and the data is such that a fused
    multiply-add (one rounding) would differ: the test can see an FMA on a GPU."""
    state = quantize(_weight(), "nf4", 32, True)
    expected = block_absmax(state)
    got = td.state_absmax(state.to(device))
    assert torch.equal(_bits(got), _bits(expected))
    codes = state.nested_code[state.absmax.long()].double()
    scales = state.nested_absmax.double().repeat_interleave(256)[:codes.numel()]
    fused = (codes * scales + state.offset).float()  # exact product, one rounding: what an FMA gives
    assert not torch.equal(fused, expected)


def test_non_power_of_two_blocksize_uses_reference(device):
    x = torch.randn(300)
    packed, absmax = reference.quantize_4bit(x, 48, *BOUNDS_4BIT["nf4"])
    levels = NF4_LEVELS
    got = td.dequantize_4bit(packed.to(device), absmax.to(device), levels.to(device), 300, 48, torch.float32)
    assert torch.equal(got.cpu(), reference.dequantize_4bit(packed, absmax, levels, 300, 48, torch.float32))


def test_dispatch_routes_only_cuda(device, monkeypatch):
    cpu_tensor = torch.zeros(2)
    assert not dispatch.use_triton(cpu_tensor)
    if device == "cuda":
        state = quantize(_weight(), "nf4", 64, True).to("cuda")
        assert dispatch.use_triton(state.packed)
        got = dispatch.dequantize_4bit(state.packed, block_absmax(state), state.code, state.numel, 64, torch.bfloat16)
        assert torch.equal(_bits(got), _bits(_oracle(state.to("cpu"), torch.bfloat16)))
        monkeypatch.setenv("QFORGE_TRITON", "0")
        assert not dispatch.use_triton(state.packed)


def test_state_fields_are_duck_typed(device):
    state = quantize(_weight(10, 30), "fp4", 64, False)
    fake = types.SimpleNamespace(**{k: getattr(state, k) for k in (
        "packed", "absmax", "shape", "dtype", "blocksize", "code", "nested_absmax", "nested_code",
        "nested_blocksize", "offset")})
    fake.packed, fake.absmax, fake.code = (t.to(device) for t in (state.packed, state.absmax, state.code))
    assert torch.equal(td.dequantize_state(fake, torch.float32).cpu().reshape(-1), _oracle(state, torch.float32))
