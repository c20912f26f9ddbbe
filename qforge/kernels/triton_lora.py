"""Triton LoRA products on a 4-bit base: the fused training layer and the gathered serving delta.

Shapes follow PEFT: A [r, in], B [out, r], scaling s; W [out, in] is the 4-bit base (QuantState).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_dequant import state_absmax
from .triton_matmul import qmatmul
from .triton_util import check_device, dot_acc, dot_mode, interpreting, rank_pad, round_to


class LoRA4bitFunction(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T for x [M, in], W [out, in] 4-bit, A [r, in], B [out, r].

    Forward: one kernel pass over x and the packed W computes both x W^T and h = x A^T (the same
    x tile feeds both products); its epilogue adds s h B^T. No dense W, no [M, out] temporary.

    Backward, with dY = dL/dy [M, out] and h = x A^T [M, r]:
        dL/dx = dY W + s (dY B) A        one fused pass again: W dequantised tile by tile
        dL/dA = s (dY B)^T x             [r, in]
        dL/dB = s dY^T (x A^T) = s dY^T h    [out, r]
    W is frozen (no dL/dW). Saved for backward: x, A, B (save_for_backward) and a reference to the
    packed QuantState; the dense W is never stored. x, A, B share one dtype (float32, bf16, fp16).
    No dropout on the adapter's input (use dropout 0, or eval mode).
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, state):
        ctx.state, ctx.scaling = state, scaling
        ctx.save_for_backward(x, A, B)
        # L1 = A^T [in, r], L2 = B^T [r, out]: transposed views, no copies.
        return qmatmul(x, state, trans_w=True, lora=(A.t(), B.t(), scaling))

    @staticmethod
    def backward(ctx, grad_y):
        x, A, B = ctx.saved_tensors
        s, state = ctx.scaling, ctx.state
        grad_y = grad_y.to(x.dtype)
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            # L1 = B [out, r], L2 = A [r, in]
            dx = qmatmul(grad_y, state, trans_w=False, lora=(B, A, s), absmax=state_absmax(state))
        if ctx.needs_input_grad[1]:
            dA = ((grad_y @ B).t() @ x) * s                 # [r, in]
        if ctx.needs_input_grad[2]:
            dB = (grad_y.t() @ (x @ A.t())) * s             # [out, r]
        return dx, dA, dB, None, None


def lora_linear_4bit(x: torch.Tensor, state, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x @ dequant(W)^T + scaling * (x @ A^T) @ B^T, bias-free; x [..., in] -> [..., out].
    A and B are cast to x's dtype (the cast is part of the autograd graph)."""
    out_features, in_features = state.shape
    x2 = x.reshape(-1, in_features)
    y = LoRA4bitFunction.apply(x2, A.to(x.dtype), B.to(x.dtype), float(scaling), state)
    return y.view(*x.shape[:-1], out_features)


@triton.jit
def _gathered_lora_kernel(x_ptr, a_ptr, b_ptr, slot_ptr, scale_ptr, y_ptr,
                          T, IN, OUT, R, NUM_SLOTS,
                          sxb, sxt, sxk, sak, sar, sai, sbk, sbo, sbr, syb, syt, syo,
                          R_PAD: tl.constexpr, DOT_MODE: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[b, t, :] = s[slot] * (x[b, t] @ A[slot]^T) @ B[slot]^T with slot = slots[b]; zero when
    slot is outside [0, NUM_SLOTS). Program (b, t-tile, out-tile); h is recomputed per out-tile
    (r is small, so that costs r / BLOCK_N of the work of one product)."""
    pid_b = tl.program_id(0)
    rt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, R_PAD)
    dtype = y_ptr.dtype.element_ty
    slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if (slot >= 0) & (slot < NUM_SLOTS):
        h = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + pid_b * sxb + rt[:, None] * sxt + kk[None, :] * sxk,
                        mask=(rt[:, None] < T) & (kk[None, :] < IN), other=0.0)
            a = tl.load(a_ptr + slot * sak + rr[None, :] * sar + kk[:, None] * sai,
                        mask=(rr[None, :] < R) & (kk[:, None] < IN), other=0.0)  # A[slot]^T tile
            h = dot_acc(x, a, h, DOT_MODE)
        s = tl.load(scale_ptr + slot)
        b = tl.load(b_ptr + slot * sbk + rn[None, :] * sbo + rr[:, None] * sbr,
                    mask=(rr[:, None] < R) & (rn[None, :] < OUT), other=0.0)    # B[slot]^T tile
        acc = dot_acc(round_to(h * s, dtype), b, acc, DOT_MODE)
    tl.store(y_ptr + pid_b * syb + rt[:, None] * syt + rn[None, :] * syo, round_to(acc, dtype),
             mask=(rt[:, None] < T) & (rn[None, :] < OUT))


def gathered_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                  scalings: torch.Tensor) -> torch.Tensor:
    """Per-row adapters for a mixed serving batch: delta[b] = s[k] * (x[b] @ A[k]^T) @ B[k]^T, k = slots[b].

    x [B, T, in] or [B, in]; A [K, r, in]; B [K, out, r] (ranks zero-padded to a common r);
    slots [B] integer, where k = K (or any k outside 0..K-1) means "no adapter" (zero delta);
    scalings [K] float. Returns delta with x's shape but `out` last, in x's dtype (A, B cast to it).
    """
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    nb, T, n_in = x3.shape
    K, r, _ = A.shape
    n_out = B.shape[1]
    check_device(x, A, B)
    A, B = A.to(x.dtype), B.to(x.dtype)
    slots = slots.to(device=x.device).reshape(-1).contiguous()
    scalings = scalings.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()
    y = torch.empty(nb, T, n_out, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y if x.dim() == 3 else y.squeeze(1)
    block_t = max(16, min(64, triton.next_power_of_2(T)))
    block_n, block_k = (64, 64) if interpreting() or T > 16 else (32, 128)
    grid = (nb, triton.cdiv(T, block_t), triton.cdiv(n_out, block_n))
    _gathered_lora_kernel[grid](x3, A, B, slots, scalings, y, T, n_in, n_out, r, K,
                                *x3.stride(), *A.stride(), *B.stride(), *y.stride(),
                                R_PAD=rank_pad(r), DOT_MODE=dot_mode(x.dtype),
                                BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y if x.dim() == 3 else y.squeeze(1)
