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

from ..quant.hqq import (HQQ_META_DTYPE, HQQState, check_hqq_group_size, hqq_dequantize, hqq_from_state_dict,
                         hqq_nbits, hqq_quantize, hqq_state_dict, hqq_state_keys)
from .bases import FrozenBase, QuantizedBase, Quant4bitBase


class HQQBase(QuantizedBase):
    """HQQ codes of W [out, in] in the `hqq` package's layout (see qforge.quant.hqq)."""

    def __init__(self, state: HQQState):
        if len(state.shape) != 2:
            raise ValueError(f"an HQQ base holds a 2-D weight, got shape {list(state.shape)}")
        super().__init__(state)

    @property
    def hqq_state(self) -> HQQState:
        return self.state

    @hqq_state.setter
    def hqq_state(self, state: HQQState) -> None:
        self.state = state

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

    def matmul(self, state: HQQState, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        w = hqq_dequantize(state, x.dtype)  # [out, in], transient: made again for backward
        return F.linear(x, w) if transposed else x @ w

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return hqq_dequantize(self.hqq_state, dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return hqq_dequantize(self.hqq_state, dtype)

    def nbytes(self) -> int:
        return self.hqq_state.nbytes()

    def own_keys(self, state_dict, prefix):
        return hqq_state_keys(state_dict, prefix)

    def read_state(self, tensors, prefix):
        return hqq_from_state_dict(tensors, prefix)

    def state_dict_of(self, prefix):
        return hqq_state_dict(self.hqq_state, prefix, compute_dtype=HQQ_META_DTYPE)

    def codes_key(self, prefix):
        return prefix + "W_q"

    def on_device(self, device: torch.device) -> bool:
        return self.hqq_state.packed.device == device and self.hqq_state.meta_tensors()[0].device == device


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
