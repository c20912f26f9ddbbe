"""Blockwise 4-bit quantisation with optional double quantisation of the block scales.

`quantize` and `dequantize` are the public pair; the hot loops live in qforge.kernels.
"""
from __future__ import annotations

import torch

from ..kernels import dispatch
from .codebooks import BOUNDS_4BIT, DYNAMIC_SIGNED, LEVELS_4BIT
from .state import QUANT_TYPES, QuantState

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def _check_input(weight: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"quantize: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize: weight dtype {weight.dtype} is not supported; expected float32, bfloat16 or float16")
    if weight.numel() == 0:
        raise ValueError(f"quantize: weight of shape {list(weight.shape)} is empty")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantize: unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize: blocksize {blocksize} is not a power of two from 32 to 4096")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"quantize: weight of shape {list(weight.shape)} holds {bad} NaN or Inf values")


def quantize(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
             double_quant: bool = True) -> QuantState:
    """Quantise `weight` (float32/bf16/fp16, any shape) to packed 4-bit codes, blockwise.

    With `double_quant`, the float32 block absmax values are themselves quantised: their mean is
    subtracted (the offset) and the rest is stored as 8-bit dynamic-map codes in blocks of 256,
    which costs 8/blocksize + 32/(blocksize*256) bits per parameter instead of 32/blocksize.
    """
    _check_input(weight, quant_type, blocksize)
    bounds, order = BOUNDS_4BIT[quant_type]
    packed, absmax = dispatch.quantize_4bit(weight.detach(), blocksize, bounds, order)
    state = QuantState(packed.reshape(-1, 1), absmax, torch.Size(weight.shape), weight.dtype, blocksize,
                       quant_type, LEVELS_4BIT[quant_type].clone().to(weight.device))
    if double_quant:
        # The mean on the host, whatever the device: a float32 sum's order is the device's own, and
        # a last-bit difference in the offset would change the stored state (absmax is small).
        offset = absmax.cpu().mean().to(absmax.device)
        codes, nested_absmax = dispatch.quantize_8bit(absmax - offset, DYNAMIC_SIGNED.to(absmax.device), NESTED_BLOCKSIZE)
        state.absmax = codes
        state.nested_absmax = nested_absmax
        state.nested_code = DYNAMIC_SIGNED.clone().to(absmax.device)
        state.nested_blocksize = NESTED_BLOCKSIZE
        state.offset = offset.item()
    return state


def block_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax of every block, undoing double quantisation when present."""
    if not state.nested:
        return state.absmax.float()
    scales = dispatch.dequantize_8bit(state.absmax, state.nested_absmax, state.nested_code, state.nested_blocksize)
    return scales + torch.tensor(state.offset, dtype=torch.float32)


def dequantize(state: QuantState, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild the tensor: level[code] * absmax[block] in float32, rounded once to `dtype`.

    Returns `state.shape` in `dtype` (default: the dtype that was quantised). `out`, when given, is
    a reusable buffer of that many elements and dtype: a layer that dequantises on every step
    writes into the same memory instead of faulting in fresh pages each time.
    """
    dtype = dtype or (out.dtype if out is not None else state.dtype)
    if out is not None and (out.numel() != state.numel or out.dtype != dtype):
        raise ValueError(f"dequantize: out has {out.numel()} {out.dtype} values, expected {state.numel} {dtype}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize: dtype {dtype} is not supported; expected float32, bfloat16 or float16")
    out = dispatch.dequantize_4bit(state.packed, block_absmax(state), state.code.float(), state.numel,
                                   state.blocksize, dtype, out)
    return out.view(state.shape)
