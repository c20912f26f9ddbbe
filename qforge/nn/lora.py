"""LoRA / DoRA adapter weights for one linear layer, and the spec that configures them.

An adapter holds A [r, in] and B [out, r] (PEFT's shapes and names), the scaling s (alpha / r, or
alpha / sqrt(r) with rsLoRA) and, for DoRA, the magnitude vector m [out].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import dispatch
from .dropout import HashDropout, dropout_args


@dataclass
class LoraSpec:
    """How to build adapters. `target_modules`: "all-linear" or a list of module-name suffixes
    (q_proj, k_proj, ...). `loftq_iters` > 0 initialises A, B (and the 4-bit base) with LoftQ."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    loftq_iters: int = 0
    dtype: torch.dtype = torch.bfloat16
    modules_to_skip: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoraSpec.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout}")
        if self.loftq_iters < 0:
            raise ValueError(f"LoraSpec.loftq_iters must be >= 0, got {self.loftq_iters}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraAdapter(nn.Module):
    """lora_A: Linear(in, r), lora_B: Linear(r, out), both without bias; B starts at zero so the
    adapted layer starts equal to the base. DoRA adds `magnitude` [out] (set by the layer)."""

    def __init__(self, in_features: int, out_features: int, spec: LoraSpec):
        super().__init__()
        self.spec = spec
        self.r, self.scaling, self.use_dora = spec.r, spec.scaling, spec.use_dora
        self.lora_A = nn.Linear(in_features, spec.r, bias=False, dtype=spec.dtype)
        self.lora_B = nn.Linear(spec.r, out_features, bias=False, dtype=spec.dtype)
        self.dropout = HashDropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=spec.dtype)) if spec.use_dora else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in float32, [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A(dropout(x))), computed in the adapter's dtype: [..., in] -> [..., out]."""
        A, B = self.lora_A.weight, self.lora_B.weight
        x = x.to(A.dtype)
        if x.device.type == "cpu" and B.dtype == A.dtype and (A.requires_grad or B.requires_grad or x.requires_grad) \
                and torch.is_grad_enabled():
            p = self.dropout.p if isinstance(self.dropout, HashDropout) and self.dropout.training else 0.0
            return LowRankFunction.apply(x, A, B, self.scaling, *dropout_args(p))
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class LowRankFunction(torch.autograd.Function):
    """s * B(A(dropout(x))) as one autograd node (training on the CPU).

    The composed form is five nodes per layer (dropout, two Linears, the scaling, under autocast
    the casts); with ~200 adapted layers a step, run forward, recomputed and run backward, their
    dispatch costs more than their arithmetic, which is small (rank r). Here forward does a
    dropout pass and two products and saves dropout(x) and h = s A(dropout(x)) (r values per row);
    backward does four small products and one dropout pass on dL/dx (the mask recomputed from its
    seed, qforge.nn.dropout).
    The scaling is applied to the (rows, r) matrix, not to the (rows, out) output. Everything runs
    in the adapter's dtype with autocast off, as the composed form computes under bf16 autocast
    for bf16 adapters.
    """

    @staticmethod
    def forward(ctx, x, A, B, scaling: float, threshold: int, keep_scale: float, seed: int | None):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            xd = x2 if seed is None else dispatch.dropout(x2.contiguous(), threshold, keep_scale, seed)
            h = (xd @ A.t()).mul_(scaling)
            out = h @ B.t()
        ctx.args = (scaling, threshold, keep_scale, seed)
        ctx.in_shape = x.shape
        ctx.save_for_backward(xd, h, A, B)  # the dropped-out input: backward needs no second mask pass
        return out.view(*x.shape[:-1], B.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xd, h, A, B = ctx.saved_tensors
        scaling, threshold, keep_scale, seed = ctx.args
        g = grad.reshape(-1, grad.shape[-1]).to(B.dtype)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = g.t() @ h                                             # (out, r)
        gh = (g @ B).mul_(scaling)                                         # (rows, r)
        if ctx.needs_input_grad[1]:
            grad_A = gh.t() @ xd                                           # (r, in)
        if ctx.needs_input_grad[0]:
            gx = gh @ A                                                    # (rows, in)
            if seed is not None:  # the same mask, from the seed
                gx = dispatch.dropout(gx, threshold, keep_scale, seed)
            grad_x = gx.view(ctx.in_shape)
        return grad_x, grad_A, grad_B, None, None, None, None
