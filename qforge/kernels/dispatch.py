"""The one place that chooses a kernel implementation.

CPU tensors: the native C path when it builds (kernels/cpu.py), else the torch reference.
CUDA tensors: the Triton kernels (kernels/triton_*.py) unless QFORGE_TRITON=0 or triton does not
import; any other case: the torch reference. Callers never branch on device: they call these
functions, and a function that has no fast path for its inputs says so by its result (None from
`lora_linear_4bit`, False from `adamw_8bit`), never by raising.
"""
from __future__ import annotations

import importlib
import math
import os
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu, reference

_NATIVE_DTYPES = tuple(cpu.DTYPE_CODES)


def _native_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and cpu.load() is not None


@lru_cache(maxsize=None)
def _triton(name: str):
    """qforge.kernels.<name> (a Triton module), or None when triton does not import here."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except Exception:  # ImportError, or a triton build that cannot initialise on this machine
        return None


def _triton_dequant():
    return _triton("triton_dequant")


def use_triton(*tensors: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels, unless QFORGE_TRITON=0 or triton does not import."""
    return (all(t.is_cuda for t in tensors) and os.environ.get("QFORGE_TRITON", "1") != "0"
            and torch.cuda.is_available() and _triton_dequant() is not None)


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor):
    """Flattened blockwise 4-bit quantisation -> (packed uint8 [(n+1)//2], absmax float32 [blocks]),
    on x's device: the native CPU kernel, the Triton kernel on CUDA (kernels/triton_quant.py), else
    the torch reference's ops on x's device. The same bits on every path."""
    if x.dtype in _NATIVE_DTYPES and _native_ok(x):
        return cpu.quantize_4bit(x, blocksize, bounds, order)
    if x.dtype in _NATIVE_DTYPES and use_triton(x) and _triton("triton_quant") is not None:
        return _triton("triton_quant").quantize_4bit(x, blocksize, bounds, order)
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
    return reference.quantize_8bit(x, code.to(x.device), blocksize, None if table is None else table.to(x.device))


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 [n] codes -> float32 [n] = code[q] * absmax[block]."""
    if _native_ok(q, absmax):
        return cpu.dequantize_8bit(q, absmax, code, blocksize)
    return reference.dequantize_8bit(q, absmax, code, blocksize)


def matrix_attention(query: torch.Tensor, n_scores: int, max_scores: int) -> bool:
    """Whether a training attention call of n_scores scores takes qforge's matrix attention
    (qforge.nn.attention: bmm + float32 softmax, faster than the CPU's SDPA for short rows) rather
    than SDPA (the flash / memory-efficient kernels on a GPU, and long rows anywhere)."""
    return query.device.type == "cpu" and n_scores <= max_scores


def counter_dropout(x: torch.Tensor) -> bool:
    """Whether x takes qforge's counter-based dropout (CPU, where it beats torch's and is
    reproducible from a seed); elsewhere torch's own fused dropout is one cheap pass already."""
    return x.device.type == "cpu"


def dropout(x: torch.Tensor, threshold: int, scale: float, seed: int) -> torch.Tensor:
    """Counter-based dropout (qforge.nn.dropout): the native kernel for float32 / bfloat16 CPU
    tensors, else the torch reference; the same bits either way."""
    if x.dtype in (torch.float32, torch.bfloat16) and _native_ok(x):
        return cpu.dropout(x, threshold, scale, seed)
    return reference.dropout(x, threshold, scale, seed)


# ---- products with a 4-bit weight ---------------------------------------------------------------
def matmul_4bit(x: torch.Tensor, state, dequantize: Callable[[torch.dtype], torch.Tensor],
                transposed: bool = True) -> torch.Tensor:
    """x @ dequant(W)^T (transposed: a layer's forward, x [..., in] -> [..., out]) or x @ dequant(W)
    (its input gradient, [..., out] -> [..., in]) for the QuantState `state` of W [out, in].
    CUDA: the Triton dequant-matmul (fused in one pass for few rows, dequantise + cuBLAS for many);
    elsewhere `dequantize(dtype)` gives W [out, in] (a caller's workspace) and torch multiplies."""
    if x.dtype in _NATIVE_DTYPES and use_triton(x, state.packed) and _triton("triton_matmul") is not None:
        out_features, in_features = state.shape
        k = in_features if transposed else out_features
        y = _triton("triton_matmul").qmatmul(x.reshape(-1, k), state, trans_w=transposed)
        return y.view(*x.shape[:-1], y.shape[-1])
    w = dequantize(x.dtype)
    return F.linear(x, w) if transposed else x @ w


def lora_linear_4bit(x: torch.Tensor, state, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """x @ dequant(W)^T + scaling * (x @ A^T) @ B^T by the fused Triton layer (forward and backward
    in one pass each over W) where it runs (CUDA; QFORGE_FUSED_LORA=0 turns it off); None elsewhere,
    and the caller composes the product from matmul_4bit and the low-rank factors."""
    # device first: on the CPU every adapted layer's forward asks, and the answer is "no" at once
    if (use_triton(x, state.packed, A, B) and x.dtype in _NATIVE_DTYPES
            and os.environ.get("QFORGE_FUSED_LORA", "1") != "0" and _triton("triton_lora") is not None):
        return _triton("triton_lora").lora_linear_4bit(x, state, A, B, scaling)
    return None


def gathered_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                  scalings: torch.Tensor) -> torch.Tensor:
    """Per-row adapters of a mixed serving batch: delta[b] = s[k] (x[b] A[k]^T) B[k]^T, k = slots[b]
    (no adapter where k is outside 0..K-1). x [B, T, in] or [B, in]; A [K, r, in]; B [K, out, r].
    CUDA: one Triton kernel; CPU float32/bfloat16 with the native library: its BGMV-style kernel,
    each row reading its own slot's factors in place (cpu.gathered_lora); otherwise, up to
    CONCATENATED_RANK slot columns (slots x rank), two products over every slot's factors
    concatenated along the rank, masked per row (reference.concatenated_lora), else the gather +
    batched products of the reference."""
    if x.dtype in _NATIVE_DTYPES and use_triton(x, A, B) and _triton("triton_lora") is not None:
        return _triton("triton_lora").gathered_lora(x, A, B, slots, scalings)
    if x.dtype in (torch.float32, torch.bfloat16) and A.dtype == B.dtype == x.dtype and _native_ok(x, A, B):
        return cpu.gathered_lora(x, A, B, slots, scalings)
    if A.shape[0] * A.shape[1] <= CONCATENATED_RANK:
        return reference.concatenated_lora(x, A, B, slots, scalings)
    return reference.gathered_lora(x, A, B, slots, scalings)


# without the native library: slot columns (slots x rank) up to which a mixed batch multiplies by every
# slot's factors rather than gathering each row's: 8 adapters of rank 32. benchmarks/serve_throughput.py
# (8 of rank 16, 32 rows): multi_vs_single 0.69 with the gather at 94c054e.
CONCATENATED_RANK = 256


# ---- the 8-bit AdamW step ---------------------------------------------------------------------
def adamw_8bit(p: torch.Tensor, grad: torch.Tensor, moments: tuple, m_map, v_map, blocksize: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> bool:
    """One AdamW update of p with 8-bit moments (m codes, m absmax, v codes, v absmax) in place by the
    native CPU kernel, bit-identical to the torch step of qforge.optim.adamw8bit. False, with nothing
    done, where no native step applies (another device, dtype or layout): the caller runs the torch step."""
    tensors = (p, grad, *moments)
    if not (p.dtype in (torch.float32, torch.bfloat16) and grad.dtype in (torch.float32, torch.bfloat16)
            and grad.shape == p.shape and p.is_contiguous() and all(t.is_contiguous() for t in moments)
            and _native_ok(*tensors)):
        return False
    cpu.adamw_8bit(p, grad.contiguous(), *moments, m_map, v_map, blocksize, beta1, beta2,
                   math.sqrt(1.0 - beta2**step), eps, 1.0 - lr * weight_decay, -lr / (1.0 - beta1**step))
    return True


def warm_up(device: torch.device) -> None:
    """Build or load what the kernels for `device` need now (the native CPU library), so that a
    measurement or a first step does not pay for it."""
    if device.type == "cpu":
        cpu.load()
