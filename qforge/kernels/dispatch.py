"""The one place that chooses a kernel implementation.

CPU tensors: the native C path when it builds (kernels/cpu.py), else the torch reference.
CUDA tensors: the Triton kernels (kernels/triton_*.py) unless QFORGE_TRITON=0 or triton does not
import; any other case: the torch reference.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import cpu, reference

_NATIVE_DTYPES = tuple(cpu.DTYPE_CODES)


def _native_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and cpu.load() is not None


@lru_cache(maxsize=1)
def _triton_dequant():
    """qforge.kernels.triton_dequant, or None when triton does not import here."""
    try:
        from . import triton_dequant
    except Exception:  # ImportError, or a triton build that cannot initialise on this machine
        return None
    return triton_dequant


def use_triton(*tensors: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels, unless QFORGE_TRITON=0 or triton does not import."""
    return (all(t.is_cuda for t in tensors) and os.environ.get("QFORGE_TRITON", "1") != "0"
            and torch.cuda.is_available() and _triton_dequant() is not None)


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor):
    """Flattened blockwise 4-bit quantisation -> (packed uint8 [(n+1)//2], absmax float32 [blocks])."""
    if x.dtype in _NATIVE_DTYPES and _native_ok(x):
        return cpu.quantize_4bit(x, blocksize, bounds, order)
    return reference.quantize_4bit(x, blocksize, bounds.to(x.device), order.to(x.device))


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                    n: int, blocksize: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed uint8 + float32 absmax -> `dtype` [n], written into `out` (contiguous, n values) if given."""
    if dtype in _NATIVE_DTYPES and _native_ok(packed, absmax) and (out is None or out.is_contiguous()):
        return cpu.dequantize_4bit(packed, absmax, levels, n, blocksize, dtype, out)
    if dtype in _NATIVE_DTYPES and use_triton(packed, absmax) and (out is None or out.is_contiguous()):
        return _triton_dequant().dequantize_4bit(packed, absmax, levels.to(packed.device), n, blocksize, dtype, out)
    result = reference.dequantize_4bit(packed, absmax, levels.to(packed.device), n, blocksize, dtype)
    return result if out is None else out.view(-1).copy_(result)


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int, table: torch.Tensor | None = None):
    """Blockwise 8-bit quantisation against the sorted map `code` -> (uint8 [n], float32 [blocks]).
    `table` (code_lookup_table(code)) may be passed by callers that reuse one map."""
    if _native_ok(x, code):
        return cpu.quantize_8bit(x, reference.code_lookup_table(code) if table is None else table, blocksize)
    return reference.quantize_8bit(x, code, blocksize, table)


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 [n] codes -> float32 [n] = code[q] * absmax[block]."""
    if _native_ok(q, absmax):
        return cpu.dequantize_8bit(q, absmax, code, blocksize)
    return reference.dequantize_8bit(q, absmax, code, blocksize)


def dropout(x: torch.Tensor, threshold: int, scale: float, seed: int) -> torch.Tensor:
    """Counter-based dropout (qforge.nn.dropout): the native kernel for float32 / bfloat16 CPU
    tensors, else the torch reference; the same bits either way."""
    if x.dtype in (torch.float32, torch.bfloat16) and _native_ok(x):
        return cpu.dropout(x, threshold, scale, seed)
    return reference.dropout(x, threshold, scale, seed)
