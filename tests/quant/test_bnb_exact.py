"""qforge.quant against bitsandbytes 0.50 (the oracle): packed bytes, scales and dequantised values
must be identical, bit for bit, for every blocksize, dtype, quant type and double-quant setting."""
import bitsandbytes.functional as bnbF
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as _bnb_default_dequantize
import pytest
import torch

from qforge.kernels import reference
from qforge.quant import QuantState, dequantize, quantize
from qforge.quant.codebooks import BOUNDS_4BIT

from .conftest import student_t

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_dequantize(packed, st):
    """bitsandbytes' dequantisation. Its native CPU kernel (AVX-512 path) looks scales up per row,
    which is wrong when a row is not a whole number of blocks (it then reuses row 0's scales); for
    those layouts the oracle is bitsandbytes' own device-independent implementation."""
    shape = list(st.shape)
    if len(shape) < 2 or shape[-1] % st.blocksize == 0:
        return bnbF.dequantize_4bit(packed, st)
    absmax = st.absmax
    if st.nested:
        absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    code = bnbF.get_4bit_type(st.quant_type, device="cpu")
    return _bnb_default_dequantize(packed.view(-1), absmax.float(), code, st.blocksize, shape, st.dtype)


def _bnb(w, quant_type, blocksize, dq):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type)


def assert_same_state(ours: QuantState, packed, st):
    assert torch.equal(ours.packed, packed), "packed bytes differ"
    assert torch.equal(ours.absmax, st.absmax), "absmax differs"
    assert list(ours.shape) == list(st.shape) and ours.dtype == st.dtype and ours.blocksize == st.blocksize
    assert torch.equal(ours.code, st.code)
    if st.nested:
        assert ours.nested
        assert torch.equal(ours.nested_absmax, st.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.nested_code, st.state2.code), "nested quant map differs"
        assert ours.offset == st.offset.item(), "offset differs"
        assert ours.nested_blocksize == st.state2.blocksize
    else:
        assert not ours.nested


def _weights(kind, shape, dtype, seed):
    if kind == "normal":
        w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    else:
        w = student_t(shape, seed=seed) * 0.02
    return w.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "student_t"])
@pytest.mark.parametrize("shape", [(256, 512), (96, 130), (33, 7), (4097,), (2, 3, 96)])
def test_matches_bitsandbytes(shape, kind, dtype, quant_type):
    w = _weights(kind, shape, dtype, seed=hash((shape, kind)) % 1000)
    for blocksize in BLOCKSIZES:
        for dq in (False, True):
            packed, st = _bnb(w, quant_type, blocksize, dq)
            ours = quantize(w, quant_type, blocksize, dq)
            assert_same_state(ours, packed, st)
            assert torch.equal(dequantize(ours), bnb_dequantize(packed, st)), (blocksize, dq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bitsandbytes_on_smollm2(smollm2_weights, dtype, quant_type):
    for name, w in smollm2_weights.items():
        w = w.to(dtype)
        for blocksize in (32, 64, 256, 4096):
            for dq in (False, True):
                packed, st = _bnb(w, quant_type, blocksize, dq)
                ours = quantize(w, quant_type, blocksize, dq)
                assert_same_state(ours, packed, st)
                assert torch.equal(dequantize(ours), bnb_dequantize(packed, st)), (name, blocksize, dq)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_native_path_equals_torch_reference(quant_type):
    """The compiled CPU kernel and the pure-torch reference give the same bits (and so does the
    reference for the dequantisation, including odd lengths and partial blocks)."""
    bounds, order = BOUNDS_4BIT[quant_type]
    for n in (1, 63, 64, 65, 1001, 8192 + 31):
        for dtype in DTYPES:
            x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
            for blocksize in (32, 64, 4096):
                p_ref, a_ref = reference.quantize_4bit(x, blocksize, bounds, order)
                state = quantize(x, quant_type, blocksize, double_quant=False)
                assert torch.equal(state.packed.view(-1), p_ref) and torch.equal(state.absmax, a_ref)
                for out_dtype in DTYPES:
                    ref = reference.dequantize_4bit(p_ref, a_ref, state.code, n, blocksize, out_dtype)
                    assert torch.equal(dequantize(state, out_dtype), ref)


def test_ties_go_to_the_lower_code_and_zero_blocks_are_exact():
    # Values exactly on an NF4 midpoint (in the scaled domain) take the lower code.
    bounds, _ = BOUNDS_4BIT["nf4"]
    x = torch.cat([torch.tensor([1.0]), bounds, torch.zeros(64 - 1 - bounds.numel())])
    state = quantize(x, "nf4", 64, double_quant=False)
    codes = torch.stack([state.packed.view(-1) >> 4, state.packed.view(-1) & 15], 1).view(-1)
    assert codes[1:16].tolist() == list(range(15))
    assert torch.equal(dequantize(quantize(torch.zeros(64, 3), "nf4", 64, True)), torch.zeros(64, 3))
