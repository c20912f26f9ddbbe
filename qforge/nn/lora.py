"""LoRA / DoRA adapter weights for one linear layer, and the spec that configures them.

An adapter holds A [r, in] and B [out, r] (PEFT's shapes and names), the scaling s (alpha / r, or
alpha / sqrt(r) with rsLoRA) and, for DoRA, the magnitude vector m [out].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .dropout import HashDropout


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

    def fusable(self, dtype: torch.dtype) -> bool:
        """Whether the layer may add B's product onto its base output in `dtype` directly
        (QLoRALinear.forward): the adapter computes in that dtype and is plain LoRA."""
        return not self.use_dora and self.lora_A.weight.dtype == self.lora_B.weight.dtype == dtype

    def scaled_down(self, x: torch.Tensor) -> torch.Tensor:
        """s * A(dropout(x)): the rank-r factor of low_rank, the scaling applied here. [..., r]"""
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_A(x) * self.scaling

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A(dropout(x))), computed in the adapter's dtype: [..., in] -> [..., out]."""
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        return self.lora_B(self.lora_A(x)) * self.scaling
