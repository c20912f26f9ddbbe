"""GPTQ (Frantar et al., 2022): int4 weights whose rounding error is fed back, column by column,
into the columns not yet quantised, weighted by the inverse Hessian of the layer's input. Pure
tensor math; the calibration loop that feeds it activations lives in adapters/compressed_tensors.

For a linear layer y = x W^T with calibration inputs X [n, in], the output error of a
quantised W' is ||X (W - W')^T||^2, a quadratic form in each row with Hessian H = 2 X^T X / n.
Quantising column i to q_i leaves an error e_i = (w_i - q_i) / [H^-1]_ii that the remaining
columns j > i absorb as w_j -= e_i [H^-1]_ij (the optimal update of the Optimal Brain Surgeon).
With U the upper Cholesky factor of H^-1, row i of U holds exactly those coefficients for the
columns still left, so the loop needs no re-inversion:

    for each block of 128 columns [a, b):
        for i in [a, b):   (a new group starts at i: its scales from the current, updated W)
            q_i = quant(w_i);  e_i = (w_i - q_i) / U_ii;  W[:, i:b] -= e_i U[i, i:b]
        W[:, b:] -= E_block U[a:b, b:]            (the block's errors, applied once)

Dampening adds 1% of the mean diagonal to H (a singular H from a short calibration set stays
solvable); a column whose input is always zero (H_ii = 0) is quantised to 0. Columns are
taken in their natural order (no act-order), so the groups are contiguous, as the format needs.
"""
from __future__ import annotations

import torch

from .int4_groups import QMAX, QMIN, int4_scales

BLOCK = 128


class HessianAccumulator:
    """Running H = 2 X^T X / n over batches of a layer's inputs (float32 [in, in])."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., in]: every leading position is one sample."""
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.hessian.mul_(self.count / (self.count + n))
        self.count += n
        x = x * (2 / self.count) ** 0.5
        self.hessian.addmm_(x.T, x)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (float32 [in, in]); the
    dampening grows tenfold (up to 3 times) while the factorisation fails."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        try:
            lower = torch.linalg.cholesky(h + damp * 10 ** attempt * torch.mean(torch.diag(h)) * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
            continue
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with 1000% dampening; "
                     "give more (or more varied) calibration rows")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group: int, dtype: torch.dtype,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float, hessian float32 [in, in] -> (q int8 [out, in] in [-8, 7], scale [out,
    in // group] in `dtype`), dequantised as int4_groups.dequantize_int4(q, scale, group)."""
    w = w.float().clone()
    w[:, torch.diag(hessian) == 0] = 0
    u = inverse_hessian_factor(hessian, damp)
    cols = w.shape[1]
    dynamic = group < cols and BLOCK % group == 0  # groups inside blocks: scales from the updated W
    scales = [] if dynamic else [int4_scales(w, group, dtype)]
    q = torch.zeros_like(w, dtype=torch.int8)
    for a in range(0, cols, BLOCK):
        b = min(a + BLOCK, cols)
        block, err = w[:, a:b].clone(), torch.zeros_like(w[:, a:b])
        for i in range(b - a):
            col = a + i
            if dynamic and col % group == 0:
                scales.append(int4_scales(block[:, i:i + group], group, dtype))
            s = (scales[-1][:, 0] if dynamic else scales[0][:, col // group]).float()       # [out]
            qi = torch.round(block[:, i] / s).clamp_(QMIN, QMAX)  # quantize_int4 / dequantize_int4, inlined
            q[:, col] = qi.to(torch.int8)
            e = (block[:, i] - qi * s) / u[col, col]
            block[:, i:].addr_(e, u[col, col:b], alpha=-1)
            err[:, i] = e
        w[:, b:] -= err @ u[a:b, b:]
    return q, torch.cat(scales, dim=1) if dynamic else scales[0]
