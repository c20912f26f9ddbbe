"""Blockwise 8-bit quantisation of optimiser state against a 256-entry map: pure tensor math.

The rule is bitsandbytes 0.50's CPU `quantize_blockwise`, bit for bit (its 8-bit blockwise
optimiser on CPU re-quantises the moments with exactly this op): per block of `block_size`
consecutive values of the flattened tensor take absmax in float32, multiply by 1/absmax, clamp
to [-1, 1], round onto a grid of 65536 evenly spaced points of [-1, 1] and read the nearest map
entry from a precomputed table. An all-zero block gets absmax 0 and code 0 (which decodes to 0).
The same pure-torch rule runs on any device; bitsandbytes' CUDA kernel picks the nearest entry
by binary search instead, so on a GPU the last code can differ from bitsandbytes' in rare ties.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..kernels import dispatch
from ..kernels.reference import code_lookup_table
from ..quant.codebooks import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED

TABLE_SIZE = 65536  # grid points of [-1, 1] in bitsandbytes' CPU lookup


class QuantMap(NamedTuple):
    """levels: float32[256], sorted; table: uint8[TABLE_SIZE], the nearest level of each grid point."""
    levels: torch.Tensor
    table: torch.Tensor


def nearest_level_table(levels: torch.Tensor) -> torch.Tensor:
    """float32[256] sorted levels -> uint8[TABLE_SIZE]: for grid point v_i = -1 + 2i/65535 the index
    of the nearest level, ties to the lower one (= #{midpoints < v_i}); float32 arithmetic."""
    return code_lookup_table(levels)


@functools.lru_cache(maxsize=None)
def dynamic_quant_map(signed: bool, device: torch.device | str = "cpu") -> QuantMap:
    """bitsandbytes' dynamic map (signed for the first moment, unsigned for the second) and its
    lookup table, built once per device: rebuilding it every step would cost more than the step."""
    levels = (DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED).to(device)
    return QuantMap(levels, nearest_level_table(levels))


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def quantize_blockwise(x: torch.Tensor, qmap: QuantMap, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float tensor, any shape, n elements -> (codes uint8[n], absmax float32[ceil(n/block_size)]).

    Every step is a separate float32 rounding, as in bitsandbytes, so the codes match it exactly
    (the kernel: qforge.kernels, native on the CPU, reference elsewhere).
    """
    return dispatch.quantize_8bit(x.reshape(-1).float(), qmap.levels, block_size, qmap.table)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap, block_size: int) -> torch.Tensor:
    """codes uint8[n], absmax float32[blocks] -> float32[n] = levels[code] * absmax[block]."""
    return dispatch.dequantize_8bit(codes.reshape(-1), absmax, qmap.levels, block_size)
