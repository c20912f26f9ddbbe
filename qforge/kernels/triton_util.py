"""Pieces shared by the Triton kernels: rounding to the output dtype, the tile product, launch sizes.

Two traps of Triton's CPU interpreter (TRITON_INTERPRET=1, which the tests use on machines
without a GPU) are handled here, so the kernels themselves carry no interpreter branches:
  * the interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest even, so
    `round_to` rounds bf16 in integer arithmetic (exact on a GPU too, and cheap next to the loads);
  * the interpreter's tl.dot on bfloat16 tiles returns garbage, so under the interpreter bf16
    tiles are widened to float32 first (exact: a bf16 x bf16 product fits in float32). On a GPU
    the native bf16 tensor-core product runs (`dot_mode`).
float32 products use input_precision="ieee": no TF32, so they match torch's float32 matmul.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DOT_NATIVE, DOT_IEEE = 0, 1


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_mode(dtype: torch.dtype) -> int:
    """DOT_IEEE for float32 operands (and bf16 under the interpreter), else DOT_NATIVE."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return DOT_IEEE
    return DOT_NATIVE


def rank_pad(r: int) -> int:
    """The rank padded to a tile side tl.dot accepts: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def log2_exact(value: int) -> int | None:
    """log2(value) when value is a positive power of two, else None."""
    if value <= 0 or value & (value - 1):
        return None
    return value.bit_length() - 1


def check_device(*tensors: torch.Tensor) -> None:
    """Triton needs GPU tensors, or CPU tensors under the interpreter; say so instead of crashing."""
    for t in tensors:
        if t is not None and t.device.type == "cpu" and not interpreting():
            raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """float32 tile -> DTYPE, rounding to nearest even. bf16 by integer arithmetic: add 0x7FFF plus
    the lowest kept bit, drop the low 16 bits (finite inputs; overflow becomes +-inf as it should)."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def dot_acc(a, b, acc, MODE: tl.constexpr):
    """acc + a @ b with float32 accumulation; MODE from `dot_mode`."""
    if MODE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
