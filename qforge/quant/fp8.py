"""FP8 (E4M3) weights with one float32 scale per output channel: compressed-tensors'
`float-quantized` format, weight-only (vLLM's W8A16-FP8 scheme). Pure tensor math.

    scale = absmax(row) / 448             float32 [out, 1] (1 where the row is all zeros)
    q     = (W / scale).to(float8_e4m3fn)   round to nearest E4M3 value; |W / scale| <= 448
    W    ~= q.float() * scale
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q float8_e4m3fn [out, in], scale float32 [out, 1])."""
    absmax = w.float().abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    q = (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q float8 [out, in], scale float32 [out, 1]) -> float32 [out, in]."""
    return q.to(scale.dtype) * scale
