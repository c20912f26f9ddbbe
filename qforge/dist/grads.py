"""The gradients of a step across ranks: sum what FSDP left whole, clip by the global norm.

FSDP reduce-scatters the sharded parameters' gradients itself (a sum, qforge.dist.shard); a
parameter kept whole on every rank (shard.keeps_blocks) has its gradient summed here. The norm
that clipping divides by is the whole model's: the squares of every rank's shards summed over the
ranks, plus the whole parameters' (the same on every rank, so counted once).
"""
from __future__ import annotations

import torch

from ..nn.bases import is_sharded
from ..optim.adamw8bit import local_part
from .group import Group


def reduce_gradients(params: list[torch.Tensor], group: Group) -> None:
    """Sum over the ranks the gradients of the parameters FSDP did not (the whole ones)."""
    group.sum_gradients([p for p in params if not is_sharded(p)])


def clip_gradients(params: list[torch.Tensor], max_norm: float, group: Group) -> torch.Tensor:
    """Scale the gradients of `params` so that their global L2 norm is at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_ does on whole tensors (which is what one process runs); the norm
    before clipping, a float32 scalar."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    sharded = sum(_square_sum(local_part(g)) for g in grads if is_sharded(g))
    whole = sum(_square_sum(g) for g in grads if not is_sharded(g))
    total = torch.tensor((group.sum([sharded])[0] + whole) ** 0.5, dtype=torch.float32)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # float32, as torch's
    with torch.no_grad():
        for g in grads:
            local_part(g).mul_(coef)
    return total


def _square_sum(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2) if t.numel() else 0.0
