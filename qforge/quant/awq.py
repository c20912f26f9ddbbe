"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales before round-to-nearest
int4. Pure tensor math; where the inverse scale is folded (a norm weight, the previous linear)
is the model code's choice (adapters/compressed_tensors).

Input channels that carry large activations matter more to the output. Scaling column j of W
by s_j and the input by 1 / s_j leaves the float product unchanged, but quantises the salient
columns on a finer relative grid:

    y = x W^T = (x / s) (W diag(s))^T   ~=   (x / s) Q(W diag(s))^T

The scales are s = mean_n |x_nj| ** alpha, normalised by sqrt(max s * min s), with alpha
searched over a grid in [0, 1] for the least output error on the calibration inputs of every
linear sharing that input (q/k/v together). alpha = 0 is s = 1, plain round-to-nearest, so the
search never ends worse than RTN on the calibration rows.
"""
from __future__ import annotations

import torch

from .int4_groups import dequantize_int4, rtn_int4

GRID = 20


def fake_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The float32 round-to-nearest int4 reconstruction of w [out, in]."""
    q, scale = rtn_int4(w, group, dtype)
    return dequantize_int4(q, scale, group)


@torch.no_grad()
def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], groups: list[int], dtype: torch.dtype,
               grid: int = GRID) -> tuple[torch.Tensor, float, float, float]:
    """x float [n, in] (calibration inputs), weights [out_i, in] sharing that input, their group
    sizes -> (scales float32 [in], best alpha, its output MSE, the MSE of plain RTN (alpha 0))."""
    x = x.float()
    mean_abs = x.abs().mean(0).clamp_(min=1e-4)                             # [in]
    reference = [x @ w.float().T for w in weights]
    best = (torch.ones_like(mean_abs), 0.0, float("inf"))
    rtn_err = float("nan")
    for k in range(grid + 1):
        alpha = k / grid
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, g, ref in zip(weights, groups, reference):
            wq = fake_int4(w.float() * s, g, dtype) / s                      # [out, in]
            err += float((x @ wq.T - ref).pow(2).mean())
        if k == 0:
            rtn_err = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], rtn_err
