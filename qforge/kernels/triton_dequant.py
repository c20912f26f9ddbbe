"""Triton 4-bit dequantisation (NF4 / FP4, optionally double-quantised absmax), bit-exact with
qforge.kernels.reference.dequantize_4bit.

Math, per element e of the flattened tensor (n elements, blocksize a power of two, 32..4096):
    code_e   = high nibble of packed[e // 2] if e is even, else the low nibble
    absmax_b = absmax[b]                                           (float32 absmax), or
             = fl(fl(nested_code[q[b]] * nested_absmax[b // nb]) + offset)   (double quant, nb = 256)
    out_e    = round_to_dtype(fl(levels[code_e] * absmax_{e // blocksize}))
where fl() is one float32 rounding. The double-quantised absmax is a multiply and then an add,
each rounded: kernels that compute it are launched with enable_fp_fusion=False so the compiler
cannot contract them into one fused multiply-add (which rounds once and differs in the last bit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_util import check_device, interpreting, log2_exact, round_to

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def nested_absmax(codes_ptr, nested_ptr, nested_code_ptr, offset, blk, mask, NESTED_LOG2: tl.constexpr):
    """float32 absmax of blocks `blk`: nested_code[codes[blk]] * nested_absmax[blk >> NESTED_LOG2] + offset."""
    q = tl.load(codes_ptr + blk, mask=mask, other=0).to(tl.int32)
    scale = tl.load(nested_code_ptr + q) * tl.load(nested_ptr + (blk >> NESTED_LOG2), mask=mask, other=0.0)
    return scale + offset


@triton.jit
def _absmax_kernel(codes_ptr, nested_ptr, nested_code_ptr, offset, out_ptr, blocks,
                   NESTED_LOG2: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = float32 absmax of block b, b < blocks (double quantisation undone)."""
    blk = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = blk < blocks
    absmax = nested_absmax(codes_ptr, nested_ptr, nested_code_ptr, offset, blk, mask, NESTED_LOG2)
    tl.store(out_ptr + blk, absmax, mask=mask)


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, nested_ptr, nested_code_ptr, offset, levels_ptr, out_ptr, n,
                    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, NESTED_LOG2: tl.constexpr,
                    BLOCK_BYTES: tl.constexpr):
    """Each program turns BLOCK_BYTES packed bytes into 2 * BLOCK_BYTES output values.

    Both nibbles of a byte share a block (blocksize is even), so the absmax is loaded once per byte.
    """
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    first = 2 * byte  # element index of the high nibble
    mask = first < n
    b = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
    blk = first >> LOG2_BS
    if NESTED:
        absmax = nested_absmax(absmax_ptr, nested_ptr, nested_code_ptr, offset, blk, mask, NESTED_LOG2)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    high = round_to(tl.load(levels_ptr + (b >> 4)) * absmax, dtype)
    low = round_to(tl.load(levels_ptr + (b & 15)) * absmax, dtype)
    index = tl.interleave(first, first + 1)
    tl.store(out_ptr + index, tl.interleave(high, low), mask=index < n)


def _nested_args(nested, device):
    """(nested_absmax, nested_code, offset, log2(nested_blocksize)) or dummies when not nested."""
    if nested is None:
        dummy = torch.zeros(1, dtype=torch.float32, device=device)
        return dummy, dummy, 0.0, 0
    nested_absmax, nested_code, offset, nested_blocksize = nested
    log2 = log2_exact(nested_blocksize)
    if log2 is None:
        raise ValueError(f"nested blocksize {nested_blocksize} is not a power of two")
    return nested_absmax.float().contiguous(), nested_code.float().contiguous(), float(offset), log2


def absmax_float32(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                   offset: float, nested_blocksize: int = 256) -> torch.Tensor:
    """Undo double quantisation: uint8 codes [blocks] -> float32 absmax [blocks], bit-exact with
    qforge.quant.block_absmax (multiply, round, add offset, round)."""
    check_device(codes)
    blocks = codes.numel()
    out = torch.empty(blocks, dtype=torch.float32, device=codes.device)
    nested_absmax, nested_code, offset, log2 = _nested_args(
        (nested_absmax, nested_code, offset, nested_blocksize), codes.device)
    block = 1024
    _absmax_kernel[(triton.cdiv(blocks, block),)](
        codes.reshape(-1).contiguous(), nested_absmax, nested_code, offset, out, blocks,
        NESTED_LOG2=log2, BLOCK=block, enable_fp_fusion=False)
    return out


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, n: int, blocksize: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None, nested=None) -> torch.Tensor:
    """packed uint8 [(n+1)//2] (any shape) -> `dtype` [n] (into `out`, contiguous, when given).

    absmax: float32 [blocks]; or, with nested = (nested_absmax float32, nested_code float32[256],
    offset, nested_blocksize), the uint8 codes of double quantisation. levels: float32[16].
    dtype: float32, bfloat16 or float16. A blocksize that is not a power of two uses the reference.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dequantize_4bit: dtype {dtype} is not float32, bfloat16 or float16")
    log2_bs = log2_exact(blocksize)
    if log2_bs is None or blocksize < 2:
        scale = absmax.float() if nested is None else absmax_float32(absmax, *nested)
        result = reference.dequantize_4bit(packed, scale, levels.float(), n, blocksize, dtype)
        return result if out is None else out.view(-1).copy_(result)
    check_device(packed, absmax, levels)
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    nested_absmax, nested_code, offset, nested_log2 = _nested_args(nested, packed.device)
    block_bytes = 4096 if interpreting() else 1024
    grid = (triton.cdiv((n + 1) // 2, block_bytes),)
    _dequant_kernel[grid](packed.reshape(-1).contiguous(), (absmax if nested else absmax.float()).contiguous(),
                          nested_absmax, nested_code, offset, levels.float().contiguous(), out.view(-1), n,
                          LOG2_BS=log2_bs, NESTED=nested is not None, NESTED_LOG2=nested_log2,
                          BLOCK_BYTES=block_bytes, num_warps=4, enable_fp_fusion=False)
    return out


def state_absmax(state) -> torch.Tensor:
    """The float32 block absmax of a QuantState (duck-typed: any object with its fields)."""
    if state.nested_absmax is None:
        return state.absmax.float().contiguous()
    return absmax_float32(state.absmax, state.nested_absmax, state.nested_code, state.offset,
                          state.nested_blocksize)


def dequantize_state(state, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(QuantState) on the Triton path, in one pass (double quantisation fused): -> state.shape."""
    nested = None
    if state.nested_absmax is not None:
        nested = (state.nested_absmax, state.nested_code, state.offset, state.nested_blocksize)
    n = int(torch.Size(state.shape).numel())
    result = dequantize_4bit(state.packed, state.absmax, state.code, n, state.blocksize,
                             dtype or state.dtype, out, nested)
    return result.view(state.shape)
