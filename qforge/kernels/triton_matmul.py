"""Triton fused dequantise-and-multiply for a 4-bit weight W [out, in] (NF4 or FP4).

    y = x @ W^T                      (trans_w=True: the linear layer's forward, x [M, in] -> [M, out])
    y = x @ W                        (trans_w=False: its input gradient, x [M, out] -> [M, in])
    y = x @ op(W) + s * (x @ L1) @ L2   (with a low-rank pair L1 [K, r], L2 [r, N]; see triton_lora)

W is never materialised: each tile of op(W) is dequantised in registers from the packed codes
(level[code] * absmax in float32, rounded once to x's dtype: the same values as
dequantize(state, x.dtype)) and multiplied with float32 accumulation. The output has x's dtype.

Supported: x float32 / bfloat16 / float16 with any M (decode M = 1.. and training M in the
thousands use different tile sizes); any out and in (blocks may straddle rows: the kernel
indexes the flattened weight); every blocksize qforge quantises with (powers of two, 32..4096);
double quantisation (the float32 absmax is rebuilt first by a tiny kernel, bit-exact). A
blocksize that is not a power of two falls back to dequantise + torch matmul.

Which path: the fused kernel re-dequantises each weight tile once per row tile of x, which is
free when x has few rows (decode: the product is bound by reading W) but costs CUDA-core work
that grows with M. Above FUSED_MAX_M rows (`fused=None`) the weight is instead dequantised once
by the Triton dequantisation kernel into a transient buffer and multiplied by cuBLAS (as Unsloth
does); the buffer is dropped at once, never saved. `fused=True/False` forces a path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_dequant import dequantize_4bit, state_absmax
from .triton_util import check_device, dot_acc, dot_mode, interpreting, log2_exact, rank_pad, round_to


@triton.jit
def load_weight_tile(packed_ptr, absmax_ptr, levels_ptr, kk, nn, K, N, in_features,
                     LOG2_BS: tl.constexpr, TRANS_W: tl.constexpr, DTYPE: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of op(W) at rows kk, columns nn, dequantised to DTYPE.
    TRANS_W: op(W)[k, n] = W[n, k]; else op(W)[k, n] = W[k, n]. W is [out, in] row-major."""
    mask = (kk[:, None] < K) & (nn[None, :] < N)
    if TRANS_W:
        flat = nn.to(tl.int64)[None, :] * in_features + kk[:, None]
    else:
        flat = kk.to(tl.int64)[:, None] * in_features + nn[None, :]
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    code = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    absmax = tl.load(absmax_ptr + (flat >> LOG2_BS), mask=mask, other=0.0)
    return round_to(tl.load(levels_ptr + code) * absmax, DTYPE)


@triton.jit
def _qmatmul_kernel(x_ptr, packed_ptr, absmax_ptr, levels_ptr, l1_ptr, l2_ptr, y_ptr,
                    M, N, K, in_features, R, scaling,
                    sxm, sxk, s1k, s1r, s2r, s2n, sym, syn,
                    LOG2_BS: tl.constexpr, TRANS_W: tl.constexpr, HAS_LORA: tl.constexpr,
                    R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ op(W) (+ scaling * (x @ L1[K, R]) @ L2[R, N]); one pass over x and W."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)  # x @ L1, only with HAS_LORA
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = load_weight_tile(packed_ptr, absmax_ptr, levels_ptr, kk, rn, K, N, in_features,
                             LOG2_BS, TRANS_W, dtype)
        acc = dot_acc(x, w, acc, DOT_MODE)
        if HAS_LORA:
            l1 = tl.load(l1_ptr + kk[:, None] * s1k + rr[None, :] * s1r,
                         mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            h = dot_acc(x, l1, h, DOT_MODE)
    if HAS_LORA:
        l2 = tl.load(l2_ptr + rr[:, None] * s2r + rn[None, :] * s2n,
                     mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc = dot_acc(round_to(h * scaling, dtype), l2, acc, DOT_MODE)
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, round_to(acc, dtype),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small M (decode) takes narrow column tiles so
    there are enough programs to cover the GPU; large M takes square tiles. The interpreter
    takes big tiles: fewer, larger numpy steps."""
    if interpreting():
        return max(16, min(64, triton.next_power_of_2(M))), 64, 64, 4
    if M <= 16:
        return 16, 32, 128, 4
    if M <= 32:
        return 32, 64, 64, 4
    return 64, 64, 64, 4


def _lora_strides(lora, dtype):
    """(l1, l2, r, scaling, strides) for the kernel; dummies when there is no low-rank pair.
    lora = (L1 [K, r], L2 [r, N], scaling); any strides."""
    if lora is None:
        return None, None, 1, 0.0, (0, 0, 0, 0)
    l1, l2, scaling = lora
    l1, l2 = l1.to(dtype), l2.to(dtype)
    return l1, l2, l1.shape[1], float(scaling), (l1.stride(0), l1.stride(1), l2.stride(0), l2.stride(1))


FUSED_MAX_M = 128  # a guess until benchmarks/gpu_bench.py has measured the crossover


def qmatmul(x: torch.Tensor, state, trans_w: bool = True, lora=None, absmax: torch.Tensor | None = None,
            fused: bool | None = None):
    """x [M, K] -> [M, N] in x's dtype: x @ op(W) (+ s * (x @ L1) @ L2), op(W) = W^T or W.

    state: a QuantState (duck-typed) of W [out, in]; absmax: its float32 block absmax when the
    caller has it already (else rebuilt here); lora: None or (L1 [K, r], L2 [r, N], s);
    fused: the one-kernel path (True), dequantise + cuBLAS (False), or by M (None).
    """
    out_features, in_features = state.shape
    K, N = (in_features, out_features) if trans_w else (out_features, in_features)
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"qmatmul: x of shape {list(x.shape)} does not fit [M, {K}]")
    log2_bs = log2_exact(state.blocksize)
    if log2_bs is None or state.blocksize < 2:
        return _fallback(x, state, trans_w, lora, absmax)
    check_device(x, state.packed)
    absmax = state_absmax(state) if absmax is None else absmax
    if not (fused if fused is not None else x.shape[0] <= FUSED_MAX_M):
        return _dequantize_then_matmul(x, state, trans_w, lora, absmax)
    l1, l2, r, scaling, (s1k, s1r, s2r, s2n) = _lora_strides(lora, x.dtype)
    M = x.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    bm, bn, bk, warps = _tiles(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _qmatmul_kernel[grid](x, state.packed.reshape(-1).contiguous(), absmax, state.code.float().contiguous(),
                          x if l1 is None else l1, x if l2 is None else l2, y,
                          M, N, K, in_features, r, scaling,
                          x.stride(0), x.stride(1), s1k, s1r, s2r, s2n, y.stride(0), y.stride(1),
                          LOG2_BS=log2_bs, TRANS_W=trans_w, HAS_LORA=lora is not None,
                          R_PAD=rank_pad(r), DOT_MODE=dot_mode(x.dtype),
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y


def _dequantize_then_matmul(x, state, trans_w, lora, absmax):
    """Large M: W dequantised once (Triton) into a transient buffer, then cuBLAS; LoRA by addmm."""
    n = int(torch.Size(state.shape).numel())
    w = dequantize_4bit(state.packed, absmax, state.code, n, state.blocksize, x.dtype).view(state.shape)
    y = x @ (w.t() if trans_w else w)
    del w
    if lora is not None:
        l1, l2, s = lora
        y.addmm_(x @ l1.to(x.dtype), l2.to(x.dtype), alpha=s)
    return y


def _fallback(x, state, trans_w, lora, absmax):
    """Dequantise with the reference and multiply with torch (blocksizes the kernel does not take)."""
    scale = state_absmax(state) if absmax is None else absmax
    n = int(torch.Size(state.shape).numel())
    w = reference.dequantize_4bit(state.packed, scale, state.code.float(), n, state.blocksize, x.dtype)
    w = w.view(state.shape)
    y = x @ (w.t() if trans_w else w)
    if lora is not None:
        l1, l2, s = lora
        y = y + ((x @ l1.to(x.dtype)) * s) @ l2.to(x.dtype)
    return y


def linear_4bit(x: torch.Tensor, state) -> torch.Tensor:
    """y = x @ dequant(W)^T without bias. x [..., in] (float32/bf16/fp16) -> [..., out], x's dtype."""
    out_features, in_features = state.shape
    y = qmatmul(x.reshape(-1, in_features), state, trans_w=True)
    return y.view(*x.shape[:-1], out_features)
