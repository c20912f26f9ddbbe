"""LoRA adapter weights for one linear layer, the spec that configures them, and the plain LoRA variant.

An adapter holds A [r, in] and B [out, r] (PEFT's shapes and names) and the scaling s (alpha / r,
or alpha / sqrt(r) with rsLoRA). What an adapter does with them is its variant's business: the
variant object (LORA here, DORA in dora.py) owns the variant's extra weights, its initialisation,
its forward, its merged weight and its per-output scale for serving, as PEFT's LoraVariant does.
A new variant is one new object; the layer, merge, PEFT files and the server ask it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from . import recompute
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


class LoraVariant:
    """Plain LoRA (and rsLoRA, which is only another scaling): y = W x + s B A x.

    Each method receives the layer (an AdaptedLinear: its `base` and dimensions) and the adapter."""

    name = "lora"
    extra_weights: dict[str, str] = {}  # adapter attribute -> PEFT key suffix, beyond lora_A / lora_B

    def __deepcopy__(self, memo):
        # one stateless object per variant: a deep-copied adapter must still be `variant is LORA`
        # (else it left the fused path for the unfused one, with other roundings)
        return self

    def create(self, adapter: "LoraAdapter", out_features: int, dtype: torch.dtype) -> None:
        """Make the variant's own parameters on a new adapter."""

    @torch.no_grad()
    def init(self, layer, adapter: "LoraAdapter") -> None:
        """Set the variant's parameters once A, B and the layer's base are final."""

    def forward(self, layer, adapter: "LoraAdapter", x: torch.Tensor) -> torch.Tensor:
        """The layer's bias-free output with this adapter for x [..., in] in the compute dtype."""
        if not adapter.dropout_active() and adapter.fusable(layer.compute_dtype):
            fused = layer.base.fused_lora(x, *adapter.weights(x.dtype), adapter.scaling)
            if fused is not None:
                return fused
        if recompute.full_recomputation() or not adapter.fusable(layer.compute_dtype):
            # The low-rank branch first, the frozen base product last: the base product saves no
            # tensor for backward, so when full checkpointing recomputes a block, its
            # recomputation stops (torch's early stop) after the last saved tensor and skips the
            # block's final base product (down_proj's), which backward does not need.
            lora = adapter.low_rank(x)
            return layer.base.product(x) + lora.to(layer.compute_dtype)
        # Otherwise (no checkpointing, selective checkpointing whose recomputation replays the base
        # product, inference) the base product first and B's product added onto it by one addmm,
        # the scaling applied to the rank-r factor: no (rows, out) passes for the scaling and the sum.
        base = layer.base.product(x)
        h = adapter.scaled_down(x)                                                    # (..., r)
        B = adapter.weights(h.dtype)[1]
        out = torch.addmm(base.reshape(-1, layer.out_features), h.reshape(-1, adapter.r), B.t())
        return out.view(base.shape)

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

    @property
    def use_dora(self) -> bool:
        return self.variant.name == "dora"

    def reset_parameters(self) -> None:
        # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in float32, [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def fusable(self, dtype: torch.dtype) -> bool:
        """Whether B's product may be added onto the base output in `dtype` directly: plain LoRA
        (its products run in the compute dtype whatever dtype its weights are kept in)."""
        return self.variant is LORA

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) for products in `dtype`: the weights themselves when kept in it,
        else cast copies whose gradients flow back to the kept weights in their dtype (float32
        weights compute in BF16 as PEFT's do under autocast: the same products, the same gradients)."""
        return self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)

    def dropout_active(self) -> bool:
        return isinstance(self.dropout, HashDropout) and self.dropout.training and self.dropout.p > 0

    def scaled_down(self, x: torch.Tensor) -> torch.Tensor:
        """s * A(dropout(x)) in x's dtype: the rank-r factor of low_rank, the scaling applied here. [..., r]"""
        return F.linear(self.dropout(x), self.weights(x.dtype)[0]) * self.scaling

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * B(A(dropout(x))), computed in x's dtype (the layer's compute dtype): [..., in] -> [..., out]."""
        A, B = self.weights(x.dtype)
        return F.linear(F.linear(self.dropout(x), A), B) * self.scaling

    def peft_weights(self) -> dict[str, torch.Tensor]:
        """PEFT key suffix -> tensor, for every weight of this adapter."""
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        out.update({suffix: getattr(self, attr) for attr, suffix in self.variant.extra_weights.items()})
        return out


__all__ = ["LoraSpec", "LoraAdapter", "LoraVariant", "LORA"]
