"""Triton 4-bit blockwise quantisation (NF4 / FP4 / INT4 code books), bit-exact with
qforge.kernels.reference.quantize_4bit (and so with bitsandbytes' CPU kernel and qforge's CPU path).

Math, per block b of `blocksize` consecutive values v of the flattened float32 input (n values):
    absmax_b = max |v|                                    (stored as is; an all-zero block stores 0)
    s        = v * fl(1 / max(absmax_b, 1e-38))           (a full block: multiply by the reciprocal)
             = v / max(absmax_b, 1e-38)                   (the trailing partial block: divide)
    s        = clamp(s, -1, 1)
    code     = order[#{k : bounds[k] < s}]                (torch.bucketize; ties go to the lower level)
and two codes a byte, element 2j in the high nibble; an odd tail is padded with the code of 0.0.
Divisions are correctly rounded (div_rn): Triton's plain `/` on a GPU is an approximate division.

One program quantises ROWS blocks, as a [ROWS, blocksize / 2] tile of (even, odd) element pairs, so
each output byte is made from one pair in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_util import check_device, interpreting, log2_exact

_TINY = 1e-38
_TILE_PAIRS = 2048  # element pairs per program (ROWS * blocksize / 2)


@triton.jit
def _quant4_kernel(x_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr, n, full_blocks, blocks,
                   BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, NBOUNDS: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)            # (ROWS,)
    pair = tl.arange(0, HALF)                                                   # (HALF,)
    first = blk[:, None] * BLOCKSIZE + 2 * pair[None, :]                        # (ROWS, HALF) even elements
    even = tl.load(x_ptr + first, mask=first < n, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + first + 1, mask=first + 1 < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))  # (ROWS,)
    safe = tl.maximum(absmax, 1e-38)
    inv = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    full = (blk < full_blocks)[:, None]
    s_even = tl.where(full, even * inv[:, None], tl.math.div_rn(even, safe[:, None]))
    s_odd = tl.where(full, odd * inv[:, None], tl.math.div_rn(odd, safe[:, None]))
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)
    i_even = tl.zeros(s_even.shape, tl.int32)
    i_odd = tl.zeros(s_odd.shape, tl.int32)
    for k in tl.static_range(NBOUNDS):
        bound = tl.load(bounds_ptr + k)
        i_even += (s_even > bound).to(tl.int32)
        i_odd += (s_odd > bound).to(tl.int32)
    c_even = tl.load(order_ptr + i_even)
    c_odd = tl.load(order_ptr + i_odd)
    byte = ((c_even << 4) | c_odd).to(tl.uint8)
    tl.store(packed_ptr + (first >> 1), byte, mask=first < n)
    tl.store(absmax_ptr + blk, absmax, mask=blk < blocks)


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor):
    """x: float32 / bfloat16 / float16, any shape -> (packed uint8 [(n+1)//2], absmax float32 [blocks]).
    bounds: float32 [15] sorted decision boundaries; order: [16] code of each bucket. A blocksize
    that is not a power of two from 2 to 4096 uses the reference."""
    log2_bs = log2_exact(blocksize)
    if log2_bs is None or not 2 <= blocksize <= 4096:
        return reference.quantize_4bit(x, blocksize, bounds.to(x.device), order.to(x.device))
    check_device(x)
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=x.device)
    rows = max(1, _TILE_PAIRS // (blocksize // 2))
    if interpreting():
        rows = max(1, min(rows, triton.next_power_of_2(blocks)))
    grid = (triton.cdiv(blocks, rows),)
    _quant4_kernel[grid](flat, bounds.to(x.device, torch.float32).contiguous(),
                         order.to(x.device, torch.int32).contiguous(), packed, absmax, n, n // blocksize, blocks,
                         BLOCKSIZE=blocksize, ROWS=rows, NBOUNDS=bounds.numel(), num_warps=4)
    return packed, absmax
