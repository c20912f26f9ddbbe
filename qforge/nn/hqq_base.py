"""HQQBase: a frozen weight held as HQQ codes (4, 3 or 2 bits, a scale and zero-point per group),
the base of HQQ + LoRA. The math and the format are qforge.quant.hqq's (bit-identical to the `hqq`
package); this class only answers an AdaptedLinear's questions about W.

    x [..., in] --(compute dtype)--> F.linear(x, W) --> y [..., out]
                                          ^
              W = (codes - zero) * scale, dequantised in float32, rounded once to x's dtype
                  (transient: made for the product, made again for backward's dL/dx)

The host's non-persistent uint8/int32 buffer `weight` is the packed codes (so `layer.weight.device`
is where the base lives); the state dict carries the `hqq` package's keys at the layer's own prefix
(`q_proj.W_q`, `q_proj.scale`, `q_proj.zero`, `q_proj.nbits`, ...: HQQLinear.state_dict()'s,
as transformers' HQQ integration and hqq's save_to_safetensors write them). Scales and zeros are
kept in float16, the package's default compute dtype, whatever the layer computes in: a model
quantised for bfloat16 training and one quantised for a float32 merge dequantise to the same W.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.hqq import (HQQ_META_DTYPE, HQQState, check_hqq_group_size, hqq_dequantize, hqq_from_state_dict,
                         hqq_nbits, hqq_quantize, hqq_state_dict, hqq_state_keys)
from . import recompute
from .bases import FrozenBase, Quant4bitBase


class HQQLinearFunction(torch.autograd.Function):
    """y = x @ W^T with W = hqq_dequantize(state). Saves nothing but a reference to the base; the
    chain rule dL/dx = dL/dy @ W dequantises again. W is frozen, so there is no dL/dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: "HQQBase", key: object) -> torch.Tensor:
        ctx.base = base
        return recompute.base_product(key, x, base.shape[0], lambda: F.linear(x, base.weight(x.dtype)))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.base.weight(grad_out.dtype), None, None


class HQQBase(FrozenBase):
    """HQQ codes of W [out, in] in the `hqq` package's layout (see qforge.quant.hqq)."""

    def __init__(self, state: HQQState):
        if len(state.shape) != 2:
            raise ValueError(f"an HQQ base holds a 2-D weight, got shape {list(state.shape)}")
        super().__init__(state.shape)
        self.hqq_state = state

    @property
    def kind(self) -> str:
        return f"hqq{self.hqq_state.nbits}"

    @classmethod
    def from_weight(cls, weight: torch.Tensor, nbits: int = 4, group_size: int = 64, axis: int = 1) -> "HQQBase":
        """Quantise `weight` [out, in] with HQQ (the package's defaults: proximal solver, zero-point
        rounded at 4 bits). ValueError for bits other than 4/3/2 or a group size that does not divide."""
        if nbits not in (4, 3, 2):
            raise ValueError(f"hqq: bits must be 4, 3 or 2, got {nbits}")
        check_hqq_group_size(group_size, weight.shape)
        state = hqq_quantize(weight.detach(), nbits, group_size, axis, meta_dtype=torch.float32)
        scale, zero = state.scale.to(HQQ_META_DTYPE), state.zero.to(HQQ_META_DTYPE)
        if torch.isfinite(scale).all() and torch.isfinite(zero).all():  # else keep float32 (huge zero-points)
            state.scale, state.zero = scale, zero
        return cls(state)

    def describe(self) -> str:
        st = self.hqq_state
        return f"quant_type=hqq{st.nbits}, group_size={st.group_size}, axis={st.axis}"

    def register(self, host: nn.Module) -> None:
        host.register_buffer("weight", self.hqq_state.packed, persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return HQQLinearFunction.apply(x, self, self.host)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return hqq_dequantize(self.hqq_state, dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return hqq_dequantize(self.hqq_state, dtype)

    def nbytes(self) -> int:
        return self.hqq_state.nbytes()

    def save_state(self, destination: dict, prefix: str) -> None:
        destination.update(hqq_state_dict(self.hqq_state, prefix, compute_dtype=HQQ_META_DTYPE))

    def load_state(self, state_dict, prefix, strict, missing_keys, error_msgs) -> None:
        own = hqq_state_keys(state_dict, prefix)
        if not own:
            if strict:
                missing_keys.append(prefix + "W_q")
            return
        try:
            state = hqq_from_state_dict({k: state_dict[k] for k in own}, prefix)
        except ValueError as exc:
            error_msgs.append(str(exc))
        else:
            if tuple(state.shape) != self.shape:
                error_msgs.append(f"{prefix}W_q: shape {list(state.shape)} does not fit {list(self.shape)}")
            else:
                self.hqq_state = state.to(self.host.weight.device)
                self.host.weight = self.hqq_state.packed
        for k in own:
            state_dict.pop(k)

    def moved(self) -> None:
        device = self.host.weight.device
        if self.hqq_state.packed.device != device or self.hqq_state.meta_tensors()[0].device != device:
            self.hqq_state = self.hqq_state.to(device)
            self.host.weight = self.hqq_state.packed


def quantized_base(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True) -> FrozenBase:
    """The frozen base of `weight` for a quant type: NF4/FP4 (Quant4bitBase: blocksize, double_quant)
    or hqq4/hqq3/hqq2 (HQQBase: blocksize is the group size; double_quant does not apply, the
    scales and zeros stay in float16)."""
    nbits = hqq_nbits(quant_type)
    if nbits is not None:
        return HQQBase.from_weight(weight, nbits, blocksize)
    return Quant4bitBase.from_weight(weight, quant_type, blocksize, double_quant)


def base_from_state_dict(tensors: dict, prefix: str) -> HQQBase:
    """An HQQBase from `hqq_state_dict` keys at `prefix` (a module path with its dot)."""
    return HQQBase(hqq_from_state_dict(tensors, prefix))
