"""Dropout whose mask is a hash of (element index, seed): nothing is stored for backward.

torch's dropout draws a Bernoulli mask from its generator (on the CPU, ~20% of a QLoRA training
step on SmolLM2 went to `bernoulli_`: every linear layer's LoRA input, twice with gradient
checkpointing) and keeps the mask for backward. Here the mask of element i is
hash32(i, seed) >> 8 >= ceil(p * 2^24), computed by one native pass on the CPU
(qforge/kernels/cpu_native.c, qf_dropout) or by the same arithmetic in torch elsewhere
(kernels/reference.py); backward recomputes it from the seed. The seed itself is drawn from
torch's default generator, so seeding, checkpoint recomputation (which restores the generator)
and exact resume behave as with torch's dropout. p is rounded up to a multiple of 2^-24; kept
values are scaled by 1 / (1 - p), as torch does. On other devices hash_dropout is torch's dropout.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import dispatch
from .functions import HashDropoutFunction


def hash_dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None):
    """Dropout with probability p of x (any shape); identity when not training or p == 0."""
    if not training or p == 0:
        return x
    if not 0 < p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not dispatch.counter_dropout(x):  # accelerators: torch's fused dropout is already one cheap pass
        return torch.nn.functional.dropout(x, p, True)
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return HashDropoutFunction.apply(x.contiguous(), math.ceil(p * 2**24), 1.0 / (1.0 - p), seed)


class HashDropout(nn.Module):
    """nn.Dropout's interface (p, train/eval) over hash_dropout."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hash_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
