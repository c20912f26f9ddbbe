"""AdaptedLinear: a frozen base weight plus named trainable adapters, in place of an nn.Linear.

    x --to compute dtype--> x_c --base.product--> W x_c --+ bias, to the residual dtype--> base_out
                             |                                                          |
                             +------------------> variant.apply(layer, adapter, x_c, base_out) --> y

    base_out = W x + b                in the residual dtype: the compute dtype, or with the float32
                                      residual (keep_input_dtype) x's float32 under autocast
    y = variant.apply(layer, adapter, x, base_out)
                                      LoRA: base_out + s B A dropout(x); DoRA: see dora.py

The layer holds the adapters and the bias and asks its base (qforge.nn.bases: 4-bit NF4/FP4, dense,
sharded 4-bit, ...) for everything about the frozen weight; the state dict carries the base's own
keys (bitsandbytes' for a 4-bit base), so a model's state dict is a checkpoint. Serving several
adapters in one batch is the server's business (qforge.serve.lora_slots), not this layer's.
"""
from __future__ import annotations

import torch
from torch import nn

from . import recompute
from .bases import DenseBase, FrozenBase
from .hqq_base import quantized_base
from .lora import LoraAdapter, LoraSpec


class AdaptedLinear(nn.Module):
    """nn.Linear's interface (in_features, out_features, weight, bias) over a frozen base, with
    named adapters of which one (`active_adapter`) takes part in forward."""

    def __init__(self, base: FrozenBase, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = base.shape
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        # the float32-residual switch (qforge.model.surgery.use_float32_residual), read in forward
        # only: under autocast, sum and return in a float32 input's dtype, as bitsandbytes'
        # Linear4bit with PEFT's adapters do, so a float32 residual stream stays float32
        self.keep_input_dtype = False
        self.set_base(base)

    @classmethod
    def quantized(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedLinear":
        """linear's weight quantised to 4 bits (QLoRA), or with quant_type hqq4/hqq3/hqq2 to HQQ codes
        (blocksize: the group size; qforge.nn.hqq_base.quantized_base)."""
        return cls(quantized_base(linear.weight, quant_type, blocksize, double_quant), linear.bias, compute_dtype)

    @classmethod
    def dense(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedLinear":
        """linear's weight kept dense in the compute dtype (BF16 LoRA)."""
        return cls(DenseBase(linear.weight, compute_dtype), linear.bias, compute_dtype)

    def set_base(self, base: FrozenBase) -> None:
        """Hold `base` (it registers its tensors on this layer), e.g. a sharded form of the current one."""
        if tuple(base.shape) != (self.out_features, self.in_features):
            raise ValueError(f"base of shape {list(base.shape)} does not fit [{self.out_features}, {self.in_features}]")
        base.attach(self)
        self.base = base

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"base={self.base.describe()}, adapters={list(self.adapters)}, active={self.active_adapter}")

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec) -> LoraAdapter:
        adapter = LoraAdapter(self.in_features, self.out_features, spec).to(self.weight.device)
        adapter.variant.init(self, adapter)
        self.adapters[name] = adapter
        self.active_adapter = self.active_adapter or name
        return adapter

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh copy of the base weight [out, in] in `dtype` (default: the compute dtype)."""
        return self.base.dequantized(dtype or self.compute_dtype)

    def active(self) -> LoraAdapter | None:
        return self.adapters[self.active_adapter] if self.active_adapter in self.adapters else None

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(self.compute_dtype)                                               # (..., in)
        residual = self.residual_dtype(x)  # the float32-residual switch, read here only
        adapter = self.active()
        if adapter is None:
            return self.finish(self.base_output(x_c, residual), x)
        fused = None if residual is not None else adapter.variant.fused(self, adapter, x_c)
        if fused is not None:  # the base product and the low-rank term in one kernel
            return self.finish(fused if self.bias is None else fused + self.bias, x)
        # The low-rank term apart, before the base product: under full recomputation, as the frozen
        # product saves no tensor, torch's early stop then ends a block's recomputation before its
        # last base product (down_proj's), which backward does not need; with the float32 residual
        # the term is added in float32, not folded into a compute-dtype addmm.
        low = adapter.low_rank(x_c) if residual is not None or recompute.full_recomputation() else None
        out = adapter.variant.apply(self, adapter, x_c, self.base_output(x_c, residual), low)  # (..., out)
        return self.finish(out, x)

    def base_output(self, x_c: torch.Tensor, residual: torch.dtype | None = None) -> torch.Tensor:
        """W x + b [..., out] for x_c [..., in] (in the compute dtype), cast to `residual` when given."""
        out = self.base.product(x_c)
        if self.bias is not None:
            out = out + self.bias
        return out if residual is None else out.to(residual)

    def residual_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """x's dtype when this forward sums in it and returns it: under autocast with
        keep_input_dtype (the float32 residual); None: the sum runs in the products' dtype."""
        if self.keep_input_dtype and x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type):
            return x.dtype
        return None

    @staticmethod
    def finish(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output's dtype. Under autocast the result stays as computed: the compute dtype, as
        nn.Linear's does, or the float32 residual's (returning the input's dtype, as bitsandbytes'
        Linear4bit does, lets the float32 norms of a k-bit model turn the whole residual stream
        into float32: on SmolLM2 ~150-300 MB more activations and a slower step than BF16 LoRA;
        it is what --residual-dtype float32 asks for, and what PEFT's recipe computes).
        Otherwise it goes back to the input's dtype."""
        if not x.dtype.is_floating_point or torch.is_autocast_enabled(x.device.type):
            return out
        return out.to(x.dtype)

    # ---- state dict and device moves: the base's tensors, under the base's keys ---------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self.base.save_state(destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.base.load_state(state_dict, prefix, strict, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.base.moved()
        return self
