"""OffloadedQuant4bitBase: the 4-bit codes kept in host memory, on the device only while in use.

The host copy (`state`: packed codes, absmax, the double-quant constants) is what stays: pinned
host memory when the device is a GPU (so the copy to the device can be asynchronous), the layer's
non-persistent buffer `weight` as for every quantised base. A device copy (`resident`, a QuantState
of fresh device tensors) exists between `bring()` and `release()`, which qforge.train.offload_base
calls around each transformer block's forward and backward; products use it.

The product's operand is the base itself, not a QuantState: the autograd Function holds its operand
until backward, so holding the device copy would keep every block's copy alive between forward and
backward. The base is resolved to whichever copy is resident when each product runs, forward or
backward. A product that finds no resident copy (a caller outside the hooks) computes from a
temporary copy made for it and counts it in `misses`: slower, never wrong.

On the CPU the "device" is the host itself: `bring()` copies into fresh host tensors and `release()`
drops them, so the tests run the same mechanism as a GPU run.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..kernels import dispatch
from ..quant import QuantState, dequantize
from .bases import FrozenBase, Quant4bitBase, dequantize_cached

_TENSORS = ("packed", "absmax", "code", "nested_absmax", "nested_code")


def map_state(state: QuantState, fn) -> QuantState:
    """`state` with fn(t) for each of its tensors (None stays None)."""
    return dataclasses.replace(state, **{k: (None if getattr(state, k) is None else fn(getattr(state, k)))
                                         for k in _TENSORS})


def state_tensors(state: QuantState) -> list[torch.Tensor]:
    return [t for t in (getattr(state, k) for k in _TENSORS) if t is not None]


class OffloadedQuant4bitBase(Quant4bitBase):
    """A Quant4bitBase whose codes live in host memory and compute on `device` from a copy brought
    there for the duration of a block's forward or backward. `quant_state` is the host copy (what
    the state dict, merges and records read); `resident` is the device copy or None."""

    shardable = False

    def __init__(self, state: QuantState, device: torch.device, pin: bool = False):
        FrozenBase.__init__(self, state.shape)
        host = map_state(state, lambda t: t.detach().to("cpu"))
        self.state = map_state(host, lambda t: t.pin_memory()) if pin else host
        self.pin = pin
        self.device = torch.device(device)
        self.resident: QuantState | None = None
        self.misses = 0  # products that found no resident copy and made a temporary one

    @classmethod
    def from_base(cls, base: Quant4bitBase, device: torch.device, pin: bool = False) -> "OffloadedQuant4bitBase":
        return cls(base.quant_state, device, pin)

    def nbytes(self) -> int:
        """Bytes of one copy of this base (host or device): codes, scales and constants."""
        return self.state.nbytes()

    # ---- the device copy ------------------------------------------------------------------------
    def bring(self, non_blocking: bool = False) -> list[torch.Tensor]:
        """Make the device copy (a no-op when it exists); its tensors, for the caller's stream
        bookkeeping. On the CPU: fresh host tensors (copy=True), as a GPU run's fresh device ones."""
        if self.resident is None:
            self.resident = map_state(self.state, lambda t: t.to(self.device, non_blocking=non_blocking, copy=True))
        return state_tensors(self.resident)

    def release(self) -> None:
        """Drop the device copy (the caching allocator reuses its memory once the queued work is done)."""
        self.resident = None

    def current(self) -> QuantState:
        """The state products compute from: the resident copy, else a temporary one (counted)."""
        if self.resident is not None:
            return self.resident
        self.misses += 1
        return map_state(self.state, lambda t: t.to(self.device))

    # ---- products: resolved when they run ------------------------------------------------------
    def operand(self) -> "OffloadedQuant4bitBase":
        return self

    def matmul(self, operand, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        state = self.current()
        return dispatch.matmul_4bit(x, state, lambda dtype: dequantize_cached(state, dtype), transposed)

    def fused_lora(self, x, A, B, scaling):
        return None  # the fused layer's Function keeps its QuantState for backward: the device copy would stay

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_cached(self.current(), dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.current(), dtype)

    def describe(self) -> str:
        return super().describe() + f", offloaded to host memory (computes on {self.device})"

    def to_sharded(self, dtype: torch.dtype):
        raise ValueError("the 4-bit base is offloaded to host memory; offloading and sharding do not combine")

    # ---- the host's hooks ------------------------------------------------------------------------
    def load_state(self, state_dict, prefix, strict, missing_keys, error_msgs) -> None:
        super().load_state(state_dict, prefix, strict, missing_keys, error_msgs)
        self._keep_on_host()

    def moved(self) -> None:
        """module.to(device) moved the buffer `weight`: the base computes there, and stays in host memory.
        (Other conversions, module.float() or a move to the CPU, leave the host codes as they are.)"""
        if self.host.weight is not self.state.packed:
            self.device = self.host.weight.device
        self._keep_on_host()

    def _keep_on_host(self) -> None:
        if self.state.packed.device.type != "cpu":
            self.state = map_state(self.state, lambda t: t.to("cpu"))
            if self.pin:
                self.state = map_state(self.state, lambda t: t.pin_memory())
        if self.host.weight is not self.state.packed:
            self.host.weight = self.state.packed
        self.resident = None


def offload_layer(layer: nn.Module, device: torch.device, pin: bool = False) -> OffloadedQuant4bitBase:
    """Give `layer` (an AdaptedLinear over a Quant4bitBase) its offloaded base; returns it."""
    base = OffloadedQuant4bitBase.from_base(layer.base, device, pin)
    layer.set_base(base)
    return base
