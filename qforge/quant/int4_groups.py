"""Symmetric int4 weights in groups along the input dimension: the W4A16 scheme of the
`compressed-tensors` format (`pack-quantized`), which vLLM and SGLang load. Pure tensor math.

For a weight W [out, in] and a group size g dividing `in` (g = in: one group per row, the
"channel" strategy), each (row, group) has one scale, stored in the model dtype:

    scale = absmax(group) / 7.5          (1 where the group is all zeros)
    q     = clamp(round(W / scale), -8, 7)                  int8 holding int4 values
    W    ~= q * scale                                       computed in float32

7.5 = (q_max - q_min) / 2 is compressed-tensors' symmetric min-max convention (the same as
GPTQ's `sym=True`). Symmetric, no zero point: what the common vLLM W4A16 checkpoints use, and
what vLLM's Marlin kernels take without a zero-point tensor.

On disk the int4 values are offset by +8 to [0, 15] and packed eight to an int32, element j of
each run of eight in bits 4j..4j+3 (little-end first): `weight_packed` [out, ceil(in / 8)].
"""
from __future__ import annotations

import math

import torch

QMIN, QMAX = -8, 7
PREFERRED_GROUP = 128


def group_size_for(in_features: int, preferred: int = PREFERRED_GROUP) -> int:
    """The group size used for a layer with `in_features` inputs: `preferred` (128) when it divides,
    else 64 or 32 when they divide (SmolLM2's 576 = 9 x 64; groups must divide the row in
    compressed-tensors), else `in_features` itself (one scale per output channel)."""
    for g in (preferred, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    return in_features


def int4_scales(w: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest scales: w [out, in] float -> [out, in // group] in `dtype`."""
    absmax = w.float().reshape(w.shape[0], -1, group).abs().amax(-1)
    scale = (absmax / ((QMAX - QMIN) / 2)).to(dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works


def _per_column(scale: torch.Tensor, group: int) -> torch.Tensor:
    """[out, in // group] -> [out, in] (each scale repeated over its group's columns)."""
    return scale.repeat_interleave(group, dim=1)


def quantize_int4(w: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """w [out, in] float, scale [out, in // group] -> int8 [out, in] in [-8, 7]."""
    return torch.round(w.float() / _per_column(scale, group).float()).clamp_(QMIN, QMAX).to(torch.int8)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """q int8 [out, in], scale [out, in // group] -> float32 [out, in]: q * scale in float32.
    With a BF16 (or FP16) scale the product is exact there (4 bits times 8 or 11), so a model in
    the scale's dtype gets it rounded once, as a product in that dtype would be; a float32 model
    gets what compressed-tensors computes after transformers loads the scales in float32."""
    return q.float() * _per_column(scale, group).float()


def rtn_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: w [out, in] float -> (q int8 [out, in], scale [out, in // group] dtype)."""
    scale = int4_scales(w, group, dtype)
    return quantize_int4(w, scale, group), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols / 8)], eight values per word."""
    rows, cols = q.shape
    u = (q.to(torch.int64) - QMIN)                                             # [0, 15]
    u = torch.nn.functional.pad(u, (0, math.ceil(cols / 8) * 8 - cols)).reshape(rows, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (u << shifts).sum(-1)                                              # < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as int32 bits


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [rows, ceil(cols / 8)] -> int8 [rows, cols] in [-8, 7] (inverse of pack_int4)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF                # [rows, words, 8]
    return (u.reshape(packed.shape[0], -1)[:, :cols] + QMIN).to(torch.int8)
