"""qforge.nn's autograd Functions, all of them: the frozen-weight product and the hash dropout.

    forward:   y = x W^T            x [..., in] -> y [..., out]
    backward:  dL/dx = dL/dy W      W made again by the base (dequantised, sliced, cast)
               no dL/dW             W is frozen

One Function serves every frozen base (4-bit NF4/FP4, dense, sharded 4-bit, HQQ, expert banks):
the base hands over an `operand` (what it multiplies by: a QuantState, a tensor, an expert index)
and answers `base.matmul(operand, x, transposed)` in both directions. Nothing is saved for backward
but references, so a quantised W is never kept dense between forward and backward, and the
products take part in the selective-checkpointing tape (qforge.nn.recompute) in one place.
"""
from __future__ import annotations

import torch

from ..kernels import dispatch
from . import recompute


class FrozenProduct(torch.autograd.Function):
    """y = base.matmul(operand, x, transposed=True); dL/dx = base.matmul(operand, dL/dy, transposed=False).

    `key` identifies the product on the recompute tape (the layer, or one expert of a bank);
    `out_features` is y's last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base, operand, key: object, out_features: int) -> torch.Tensor:
        ctx.base, ctx.operand = base, operand  # references, not saved tensors: checkpointing's early stop holds
        # inside a selectively checkpointed layer's recomputation: the output kept from forward
        return recompute.base_product(key, x, out_features, lambda: base.matmul(operand, x, True))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return ctx.base.matmul(ctx.operand, grad_out, False), None, None, None, None


def frozen_product(x: torch.Tensor, base, operand, key: object, out_features: int) -> torch.Tensor:
    """x [..., in] @ W^T -> [..., out] for the frozen W `base` holds as `operand`, differentiable in x."""
    return FrozenProduct.apply(x, base, operand, key, out_features)


class HashDropoutFunction(torch.autograd.Function):
    """Dropout by a hash of (element index, seed): backward recomputes the mask from the seed
    (qforge.nn.dropout), so nothing is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int, scale: float, seed: int) -> torch.Tensor:
        ctx.args = (threshold, scale, seed)
        return dispatch.dropout(x, threshold, scale, seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        threshold, scale, seed = ctx.args
        return dispatch.dropout(grad.contiguous(), threshold, scale, seed), None, None, None


__all__ = ["FrozenProduct", "frozen_product", "HashDropoutFunction"]
