"""AdaptedLinear: a frozen base weight plus named trainable adapters, in place of an nn.Linear.

    y = base.product(x) + bias                     (no active adapter)
    y = variant.forward(layer, adapter, x) + bias  (LoRA: W x + s B A dropout(x); DoRA: see dora.py)

The layer holds the adapters and the bias and asks its base (qforge.nn.bases: 4-bit NF4/FP4, dense,
sharded 4-bit, ...) for everything about the frozen weight; the state dict carries the base's own
keys (bitsandbytes' for a 4-bit base), so a model's state dict is a checkpoint. Serving several
adapters in one batch is the server's business (qforge.serve.lora_slots), not this layer's.
"""
from __future__ import annotations

import torch
from torch import nn

from .bases import DenseBase, FrozenBase
from .hqq_base import HQQBase, quantized_base
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
        # under autocast, return a float32 input's dtype (bitsandbytes' Linear4bit with PEFT's
        # adapters do): a float32 residual stream stays float32 (qforge.model.surgery.use_float32_residual)
        self.keep_input_dtype = False
        self.set_base(base)

    @classmethod
    def quantized(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedLinear":
        """linear's weight quantised to 4 bits (QLoRA), or with quant_type hqq4/hqq3/hqq2 to HQQ codes
        (blocksize: the group size; qforge.nn.hqq_base.quantized_base)."""
        return cls(quantized_base(linear.weight, quant_type, blocksize, double_quant), linear.bias, compute_dtype)

    @classmethod
    def hqq(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64,
            compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedLinear":
        """linear's weight quantised with HQQ at `bits` (4, 3 or 2), a scale and zero per `group_size`."""
        return cls(HQQBase.from_weight(linear.weight, bits, group_size), linear.bias, compute_dtype)

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

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(self.compute_dtype)
        adapter = self.adapters[self.active_adapter] if self.active_adapter in self.adapters else None
        if adapter is not None and self.returns_input_dtype(x) and adapter.fusable(self.compute_dtype):
            # PEFT over Linear4bit: the base product (+ bias) and the low-rank term s*B(A x) each
            # in the compute dtype, added in the input's dtype (float32 for a float32 residual:
            # not rounded to the compute dtype first); the low-rank branch first, as the unfused
            # path orders it for full recomputation
            lora = adapter.low_rank(x_c)
            out = self.base.product(x_c)
            if self.bias is not None:
                out = out + self.bias
            return out.to(x.dtype) + lora.to(x.dtype)
        out = self.base.product(x_c) if adapter is None else adapter.variant.forward(self, adapter, x_c)
        return self.finish(out, x)

    def returns_input_dtype(self, x: torch.Tensor) -> bool:
        """Whether this forward under autocast returns x's dtype (keep_input_dtype), not the compute dtype."""
        return self.keep_input_dtype and x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type)

    def finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add the bias. Under autocast the result stays in the compute dtype, as nn.Linear's does
        (unless keep_input_dtype); otherwise it goes back to the input's dtype. (Returning the
        input's dtype under autocast, as bitsandbytes' Linear4bit does, lets the float32 norms of a
        k-bit model turn the whole residual stream into float32: on SmolLM2 that cost ~150-300 MB
        of activations and a slower step than BF16 LoRA; it is what --residual-dtype float32 asks
        for, and what PEFT's recipe computes.)"""
        if self.bias is not None:
            out = out + self.bias
        if not x.dtype.is_floating_point:
            return out
        if torch.is_autocast_enabled(x.device.type):
            return out.to(x.dtype) if self.returns_input_dtype(x) else out
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
