"""LoRA adapter weights for one linear layer, the spec that configures them, and the plain LoRA variant.

An adapter holds A [r, in] and B [out, r] (PEFT's shapes and names) and the scaling s (alpha / r,
or alpha / sqrt(r) with rsLoRA). What an adapter does with them is its variant's business: the
variant object (LORA here, DORA in dora.py) owns the variant's extra weights, its initialisation,
its term (added onto a base output the layer computed), its merged weight and its per-output scale
for serving, as PEFT's LoraVariant does.
A new variant is one new object; the layer, merge, PEFT files and the server ask it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .dropout import HashDropout


@dataclass
class LoraSpec:
    """How to build adapters. `target_modules`: "all-linear" or a list of module-name suffixes
    (q_proj, k_proj, ...). `loftq_iters` > 0 initialises A, B (and the 4-bit base) with LoftQ.
    `dtype` is the dtype the weights are kept (and trained, and saved) in; the products run in the
    layer's compute dtype whatever it is. Float32, the default as in PEFT (autocast_adapter_dtype),
    keeps every optimiser update: in BF16 an Adam step below half a BF16 ulp of a weight
    (|update| < |w| / 256) is rounded away."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    loftq_iters: int = 0
    dtype: torch.dtype = torch.float32
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

    @property
    def variant(self) -> "LoraVariant":
        from .dora import DORA
        return DORA if self.use_dora else LORA


def low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling) -> torch.Tensor:
    """s (x A^T) B^T: x [..., in], A [r, in], B [out, r] -> [..., out], in x's dtype.
    The one low-rank product of LoRA, DoRA, expert adapters and the serving slots."""
    return F.linear(F.linear(x, A), B) * scaling


def add_low_rank(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling) -> torch.Tensor:
    """out + s (x A^T) B^T by one addmm onto out [..., out_features], the scaling applied to the rank-r
    factor: no (rows, out) pass for the scaling or the sum. x [..., in], A [r, in], B [out, r]."""
    h = F.linear(x, A) * scaling                                                      # (..., r)
    y = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.to(h.dtype).t())
    return y.view(out.shape)


class LoraVariant:
    """Plain LoRA (and rsLoRA, which is only another scaling): y = W x + b + s B A x.

    PEFT's LoraVariant contract: the layer computes the base output (product, bias, residual dtype)
    and `apply` adds the variant's term onto it. Each method receives the layer (an AdaptedLinear:
    its `base`, `bias` and dimensions) and the adapter."""

    name = "lora"
    extra_weights: dict[str, str] = {}  # adapter attribute -> PEFT key suffix, beyond lora_A / lora_B

    def create(self, adapter: "LoraAdapter", out_features: int, dtype: torch.dtype) -> None:
        """Make the variant's own parameters on a new adapter."""

    @torch.no_grad()
    def init(self, layer, adapter: "LoraAdapter") -> None:
        """Set the variant's parameters once A, B and the layer's base are final."""

    def fused(self, layer, adapter: "LoraAdapter", x: torch.Tensor) -> torch.Tensor | None:
        """x W^T + s B A x (no bias) by one fused kernel of the base where one runs (CUDA), else None.
        x [..., in] in the compute dtype. Not with dropout: the kernel takes x as A's input."""
        if adapter.dropout_active():
            return None
        return layer.base.fused_lora(x, *adapter.weights(x.dtype), adapter.scaling)

    def apply(self, layer, adapter: "LoraAdapter", x: torch.Tensor, base_out: torch.Tensor,
              low: torch.Tensor | None = None) -> torch.Tensor:
        """base_out + s B A dropout(x), in base_out's dtype. x [..., in] in the compute dtype;
        base_out [..., out] (W x + b); `low`: the low-rank term when the layer computed it already
        (AdaptedLinear.forward decides when), else B's product goes onto base_out by one addmm."""
        if low is not None:
            return base_out + low.to(base_out.dtype)
        A, B = adapter.weights(x.dtype)
        return add_low_rank(base_out, adapter.dropout(x), A, B, adapter.scaling)

    @torch.no_grad()
    def merged_weight(self, w: torch.Tensor, adapter: "LoraAdapter") -> torch.Tensor:
        """The float32 weight equal to the adapted layer's forward, from the float32 base w [out, in]."""
        return w + adapter.delta_weight().to(w.device)

    @torch.no_grad()
    def serving_scale(self, layer, adapter: "LoraAdapter") -> torch.Tensor | None:
        """A per-output factor the server applies to (base + low-rank) at inference, or None (1)."""
        return None


LORA = LoraVariant()


class LoraAdapter(nn.Module):
    """lora_A: Linear(in, r), lora_B: Linear(r, out), both without bias; B starts at zero so the
    adapted layer starts equal to the base. The variant adds what it needs (DoRA: `magnitude`)."""

    def __init__(self, in_features: int, out_features: int, spec: LoraSpec):
        super().__init__()
        self.spec = spec
        self.variant = spec.variant
        self.r, self.scaling = spec.r, spec.scaling
        self.lora_A = nn.Linear(in_features, spec.r, bias=False, dtype=spec.dtype)
        self.lora_B = nn.Linear(spec.r, out_features, bias=False, dtype=spec.dtype)
        self.dropout = HashDropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.variant.create(self, out_features, spec.dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in float32, [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) for products in `dtype`: the weights themselves when kept in it,
        else cast copies whose gradients flow back to the kept weights in their dtype (float32
        weights compute in BF16 as PEFT's do under autocast: the same products, the same gradients)."""
        return self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)

    def dropout_active(self) -> bool:
        return isinstance(self.dropout, HashDropout) and self.dropout.training and self.dropout.p > 0

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A(dropout(x))), computed in x's dtype (the layer's compute dtype): [..., in] -> [..., out]."""
        return low_rank(self.dropout(x), *self.weights(x.dtype), self.scaling)

    def peft_weights(self) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> tensor, for every weight of this adapter."""
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        out.update({suffix: getattr(self, attr) for attr, suffix in self.variant.extra_weights.items()})
        return out


__all__ = ["LoraSpec", "LoraAdapter", "LoraVariant", "LORA", "low_rank", "add_low_rank"]
