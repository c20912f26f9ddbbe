"""Quantisation codebooks: module constants, built once.

Every level table here must equal bitsandbytes' to the bit, because a packed 4-bit code
only means something together with its table. Tests compare each against bitsandbytes.
"""
from __future__ import annotations

import torch

# NormalFloat-4: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA, Dettmers et al.).
# Indexed by the 4-bit code 0..15.
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# FP4 (E2M1 with bitsandbytes' exponent bias): bit 3 is the sign, codes 8..15 mirror 0..7.
# bitsandbytes normalises the raw values by their max (12) in float32; dividing the same way
# keeps the last bit identical.
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
FP4_LEVELS = torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0

# Symmetric 4-bit integer grid k/7, k = -7..7; code 15 repeats 1.0 so the table stays sorted and
# is never chosen (ties go to the lower code). A baseline for comparison only.
INT4_LEVELS = torch.tensor([k / 7 for k in range(-7, 8)] + [1.0], dtype=torch.float32)

LEVELS_4BIT = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}


def _bounds_and_order(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries between neighbouring levels in sorted order, and the sort order.

    A value v gets sorted position #{bounds < v}, so a value exactly on a midpoint goes to the
    lower level; `order[position]` is then the code. float32 arithmetic, as bitsandbytes does it.
    """
    order = torch.argsort(levels, stable=True)
    s = levels[order]
    bounds = (s[:-1] + s[1:]) / 2
    return bounds.contiguous(), order.to(torch.uint8).contiguous()


BOUNDS_4BIT = {name: _bounds_and_order(lv) for name, lv in LEVELS_4BIT.items()}


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic (exponent + fraction) map of Dettmers' 8-bit optimisers, sorted, float32[256].

    For each exponent e = 0..max_exponent_bits-1, the fraction grid is the midpoints of an evenly
    spaced grid on [0.1, 1] scaled by 10**(e - max_exponent_bits + 1); the signed map mirrors each
    value, then 0 and 1 close the table. Built with the same float32 steps as bitsandbytes so the
    table is identical to the bit (the double-quantised absmax and the optimiser state depend on it).
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    for e in range(max_exponent_bits):
        frac_bits = e + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        edges = torch.linspace(0.1, 1, 2**frac_bits + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0)
        scale = 10 ** (-(max_exponent_bits - 1) + e)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:  # only when the exponent does not use every non-sign bit
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_SIGNED = dynamic_map(signed=True)
DYNAMIC_UNSIGNED = dynamic_map(signed=False)
