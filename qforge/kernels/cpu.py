"""The native CPU path: cpu_native.c compiled once with the system C compiler, loaded by ctypes.

The shared object is cached by a hash of the source, the flags and the machine, so a change to
either rebuilds it. When no compiler is present `load()` returns None and dispatch falls back to
the pure-torch reference: slower, same bits.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from ..paths import cache_dir

_SOURCE = Path(__file__).with_name("cpu_native.c")
# -ffp-contract=off: no fused multiply-add, so results round exactly as the torch reference does.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: a concurrent loader sees the old name or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load():
    """The compiled library, or None when it cannot be built here (QFORGE_NATIVE=0 disables it)."""
    if os.environ.get("QFORGE_NATIVE", "1") == "0":
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + platform.machine().encode()
                         + platform.processor().encode()).hexdigest()[:16]
    target = cache_dir("kernels") / f"qforge_cpu_{key}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError):
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qf_quantize_4bit.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, ptr]
    lib.qf_dequantize_4bit.argtypes = [ptr, ptr, ptr, i64, i64, i32, ptr]
    lib.qf_quantize_8bit.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.qf_dequantize_8bit.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.qf_dropout.argtypes = [ptr, i32, i64, ctypes.c_uint32, ctypes.c_float, ctypes.c_uint32, ctypes.c_uint32, ptr]
    f32 = ctypes.c_float
    lib.qf_adamw_8bit_moments.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, f32, f32, f32, f32,
                                          ptr, ptr]
    lib.qf_adamw_8bit_apply.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                        f32, f32, f32, f32]
    lib.qf_gathered_lora.argtypes = [ptr, i32, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr]
    return lib


def gathered_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                  scalings: torch.Tensor) -> torch.Tensor:
    """reference.gathered_lora read in place (qf_gathered_lora): x [B, T, in] or [B, in] float32 or
    bfloat16; A [K, r, in], B [K, out, r] (cast to x's dtype when they are not in it); -> [B, T, out]
    or [B, out] in x's dtype."""
    lib = load()
    x3 = (x if x.dim() == 3 else x.unsqueeze(1)).contiguous()
    A, B = A.to(x.dtype).contiguous(), B.to(x.dtype).contiguous()
    (K, r, n_in), n_out = A.shape, B.shape[1]
    slots = slots.reshape(-1).to(torch.int64).contiguous()
    scalings = scalings.float().contiguous()
    out = torch.empty(x3.shape[0], x3.shape[1], n_out, dtype=x.dtype)
    lib.qf_gathered_lora(x3.data_ptr(), DTYPE_CODES[x.dtype], x3.shape[0], x3.shape[1], n_in, A.data_ptr(),
                         B.data_ptr(), K, r, n_out, slots.data_ptr(), scalings.data_ptr(), out.data_ptr())
    return out if x.dim() == 3 else out.squeeze(1)


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor):
    lib = load()
    x = x.contiguous()
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    lib.qf_quantize_4bit(x.data_ptr(), DTYPE_CODES[x.dtype], n, blocksize, bounds.data_ptr(),
                         order.data_ptr(), packed.data_ptr(), absmax.data_ptr())
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                    n: int, blocksize: int, dtype: torch.dtype, out: torch.Tensor | None = None):
    lib = load()
    packed = packed.contiguous()
    absmax = absmax.float().contiguous()
    if out is None:
        out = torch.empty(n, dtype=dtype)
    lib.qf_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), levels.data_ptr(), n, blocksize,
                           DTYPE_CODES[dtype], out.data_ptr())
    return out


def quantize_8bit(x: torch.Tensor, table: torch.Tensor, blocksize: int):
    """float32 [n] -> (codes uint8 [n], absmax float32 [blocks]); `table` is the map's uint8[65536]
    nearest-entry table (reference.code_lookup_table)."""
    lib = load()
    x = x.reshape(-1).float().contiguous()
    n = x.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    lib.qf_quantize_8bit(x.data_ptr(), n, blocksize, table.data_ptr(), codes.data_ptr(), absmax.data_ptr())
    return codes, absmax


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, blocksize: int) -> torch.Tensor:
    lib = load()
    codes = codes.reshape(-1).contiguous()
    out = torch.empty(codes.numel(), dtype=torch.float32)
    lib.qf_dequantize_8bit(codes.data_ptr(), absmax.float().contiguous().data_ptr(), levels.float().contiguous().data_ptr(),
                           codes.numel(), blocksize, out.data_ptr())
    return out


def dropout(x: torch.Tensor, threshold: int, scale: float, seed: int) -> torch.Tensor:
    """Counter-based dropout of a float32 or bfloat16 tensor (see qf_dropout); a new tensor."""
    lib = load()
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.qf_dropout(x.data_ptr(), DTYPE_CODES[x.dtype], x.numel(), threshold, scale, seed & 0xFFFFFFFF,
                   (seed >> 32) & 0xFFFFFFFF, out.data_ptr())
    return out


def adamw_8bit(p: torch.Tensor, grad: torch.Tensor, m_codes, m_absmax, v_codes, v_absmax, m_map, v_map,
               blocksize: int, beta1: float, beta2: float, bias_correction2_sqrt: float, eps: float,
               decay: float, step_size: float) -> None:
    """One AdamW update with 8-bit moments in place (qf_adamw_8bit_moments, torch's sqrt,
    qf_adamw_8bit_apply): p and grad contiguous float32 or bfloat16 CPU tensors; the codes/absmax
    are the state's own tensors; m_map, v_map the moments' QuantMaps (levels, table). Scalars are
    rounded to float32 as torch rounds them."""
    lib = load()
    n = p.numel()
    m, v = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    lib.qf_adamw_8bit_moments(grad.data_ptr(), DTYPE_CODES[grad.dtype], n, blocksize, m_codes.data_ptr(),
                              m_absmax.data_ptr(), v_codes.data_ptr(), v_absmax.data_ptr(), m_map.levels.data_ptr(),
                              v_map.levels.data_ptr(), beta1, 1.0 - beta1, beta2, 1.0 - beta2, m.data_ptr(), v.data_ptr())
    v_sqrt = v.sqrt()
    lib.qf_adamw_8bit_apply(p.data_ptr(), DTYPE_CODES[p.dtype], n, blocksize, m.data_ptr(), v.data_ptr(),
                            v_sqrt.data_ptr(), m_codes.data_ptr(), m_absmax.data_ptr(), v_codes.data_ptr(),
                            v_absmax.data_ptr(), m_map.table.data_ptr(), v_map.table.data_ptr(),
                            bias_correction2_sqrt, eps, decay, step_size)
