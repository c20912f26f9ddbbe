"""Frozen bases: the weight W [out, in] that an AdaptedLinear adapts, in whatever form it is stored.

A base answers the layer's questions about W and nothing else:
    product(x)          x @ W^T without bias, differentiable in x (W is frozen: no dL/dW)
    weight(dtype)       W dequantised into a transient workspace (use at once; for norms)
    dequantized(dtype)  a fresh copy of W [out, in]
and keeps W's tensors registered on the layer under the layer's own names, so a model's state
dict holds a checkpoint's keys (`q_proj.weight`, `q_proj.weight.absmax`, ...), not the base's.

Bases here:
    Quant4bitBase   NF4 / FP4 blockwise codes with optional double quantisation, bitsandbytes'
                    layout and keys (the QLoRA base)
    DenseBase       an ordinary frozen tensor (BF16 LoRA, and the reference QLoRA is compared to)
    ShardedQuant4bitBase  the same codes held in float Parameters FSDP can shard (qforge.dist)
A new base (HQQ, a GPU format) is one new class with these methods.

Every product goes through the one autograd Function of qforge.nn.functions (FrozenProduct): a
base names the operand it multiplies by and answers `matmul(operand, x, transposed)` both ways;
nothing is saved for backward but a reference, so backward dequantises again rather than keep a
dense copy alive between the two. The quantised bases (4-bit here, HQQ in hqq_base.py) share their
state handling (QuantizedBase: registration, state-dict keys, device moves).
Which kernel computes a product (a fused Triton dequant-matmul on CUDA, dequantise + GEMM
elsewhere) is decided in qforge.kernels.dispatch, nowhere here.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch
from ..quant import QuantState, dequantize, quantize
from . import recompute
from .functions import frozen_product

_WORKSPACES: dict[tuple, torch.Tensor] = {}


def dequantize_cached(state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise into a workspace shared by every layer of the same size and dtype.

    The result is transient: valid only until the next call for the same size. Layers use it for
    one product and drop it, so the process reuses one buffer per shape instead of faulting in
    fresh pages on every forward and backward.
    """
    key = (state.numel, dtype, state.packed.device)
    buf = _WORKSPACES.get(key)
    if buf is None:
        buf = _WORKSPACES[key] = torch.empty(state.numel, dtype=dtype, device=state.packed.device)
    return dequantize(state, dtype, out=buf)


class FrozenBase:
    """What an AdaptedLinear asks of its frozen weight. `attach` registers the base's tensors on the
    layer (`host`); the hooks below are called from the layer's own state-dict and device methods.

    A subclass names what its product multiplies by (`operand`: taken once per forward and held by
    the autograd Function for backward) and how (`matmul`); `product` is then the one Function."""

    kind = "base"
    shardable = False  # True: qforge.dist can swap it for a sharded form (to_sharded)

    def __init__(self, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.host: nn.Module | None = None

    def attach(self, host: nn.Module) -> None:
        """Register this base's tensors on `host`. Again on another host (a serving wrapper of the
        layer, qforge.serve.lora_slots) registers the same tensors there: both hosts share them."""
        self.register(host)
        self.host = host

    # ---- what each base provides --------------------------------------------------------------
    def register(self, host: nn.Module) -> None:
        """Put the base's tensors on `host`; `self.host` is still the previous host (or None)."""
        raise NotImplementedError

    def operand(self):
        """What the product multiplies by (a QuantState, a tensor): held for backward, never copied."""
        raise NotImplementedError

    def matmul(self, operand, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        """x @ W^T (transposed: [..., in] -> [..., out]) or x @ W ([..., out] -> [..., in]), W from operand."""
        raise NotImplementedError

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W^T -> [..., out], without bias, differentiable in x only."""
        return frozen_product(x, self, self.operand(), self.host, self.shape[0])

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def fused_lora(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
        """x W^T + s (x A^T) B^T in one fused kernel where one runs for this base and device, else None."""
        return None

    def describe(self) -> str:
        return self.kind

    # ---- hooks of the host's nn.Module methods (plain tensors need none) ----------------------
    def save_state(self, destination: dict, prefix: str) -> None:
        """After nn.Module saved the registered persistent tensors under `prefix`."""

    def load_state(self, state_dict: dict, prefix: str, strict: bool, missing_keys: list, error_msgs: list) -> None:
        """Before nn.Module loads its registered tensors: take (pop) the keys this base reads itself."""

    def moved(self) -> None:
        """After the host's tensors moved (module.to / cuda / cpu)."""


class DenseBase(FrozenBase):
    """An ordinary frozen weight, registered as the host's Parameter `weight` [out, in]."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None):
        super().__init__(weight.shape)
        self._initial = weight.detach().to(dtype or weight.dtype)

    def register(self, host: nn.Module) -> None:
        if self.host is not None:  # a second host: the same Parameter
            host.weight = self.host.weight
            return
        host.weight = nn.Parameter(self._initial, requires_grad=False)
        self._initial = None

    def operand(self) -> torch.Tensor:
        return self.host.weight

    def matmul(self, weight: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        return F.linear(x, weight) if transposed else x @ weight.to(x.dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.host.weight
        weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if weight.requires_grad:  # a trainable base (not qforge's LoRA): plain autograd
                return F.linear(x, weight)
            # through the frozen product, with the same selective-checkpointing tape as the 4-bit
            # product, so BF16 LoRA and QLoRA runs compare fairly
            return frozen_product(x, self, weight, self.host, self.shape[0])
        return F.linear(x, weight)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.host.weight.to(dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.host.weight.detach().to(dtype).clone()


class QuantizedBase(FrozenBase):
    """A base whose W is a quantised state object (`state`: codes and scales, with `packed`,
    `shape`, `to(device)`): the packed codes are the host's non-persistent buffer `weight` (so
    `layer.weight.device` is where the base lives); the state dict carries the format's own keys,
    which a subclass reads and writes (`own_keys`, `read_state`, `state_dict_of`, `codes_key`)."""

    def __init__(self, state):
        super().__init__(state.shape)
        self.state = state

    def register(self, host: nn.Module) -> None:
        host.register_buffer("weight", self.state.packed, persistent=False)

    def operand(self):
        return self.state

    # ---- the format's keys ----------------------------------------------------------------------
    def own_keys(self, state_dict: dict, prefix: str) -> list[str]:
        raise NotImplementedError

    def read_state(self, tensors: dict, prefix: str):
        """The state from its keys at `prefix`; ValueError when they do not make one."""
        raise NotImplementedError

    def state_dict_of(self, prefix: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def codes_key(self, prefix: str) -> str:
        """The key that names the codes in messages (missing, wrong shape)."""
        raise NotImplementedError

    def on_device(self, device: torch.device) -> bool:
        return self.state.packed.device == device

    # ---- the host's hooks -----------------------------------------------------------------------
    def save_state(self, destination: dict, prefix: str) -> None:
        destination.update(self.state_dict_of(prefix))

    def load_state(self, state_dict, prefix, strict, missing_keys, error_msgs) -> None:
        own = self.own_keys(state_dict, prefix)
        if not own:
            if strict:
                missing_keys.append(self.codes_key(prefix))
            return
        try:
            state = self.read_state({k: state_dict[k] for k in own}, prefix)
        except ValueError as exc:
            error_msgs.append(str(exc))
        else:
            if tuple(state.shape) != self.shape:
                error_msgs.append(f"{self.codes_key(prefix)}: shape {list(state.shape)} does not fit {list(self.shape)}")
            else:
                self.state = state.to(self.host.weight.device)
                self.host.weight = self.state.packed
        for k in own:
            state_dict.pop(k)

    def moved(self) -> None:
        device = self.host.weight.device
        if not self.on_device(device):
            self.state = self.state.to(device)
            self.host.weight = self.state.packed


class Quant4bitBase(QuantizedBase):
    """NF4 / FP4 codes in bitsandbytes' layout: the host's non-persistent uint8 buffer `weight`
    [(out*in+1)//2, 1] is the packed codes (as in bitsandbytes' Linear4bit); the state dict carries
    bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`, ...)."""

    shardable = True

    @property
    def quant_state(self) -> QuantState:
        return self.state

    @quant_state.setter
    def quant_state(self, state: QuantState) -> None:
        self.state = state

    @property
    def kind(self) -> str:
        return self.quant_state.quant_type

    @classmethod
    def from_weight(cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True) -> "Quant4bitBase":
        return cls(quantize(weight.detach(), quant_type, blocksize, double_quant))

    def describe(self) -> str:
        st = self.quant_state
        return f"quant_type={st.quant_type}, blocksize={st.blocksize}, double_quant={st.nested}"

    def operand(self) -> QuantState:
        return self.quant_state

    def matmul(self, state: QuantState, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        return dispatch.matmul_4bit(x, state, lambda dtype: dequantize_cached(state, dtype), transposed)

    def fused_lora(self, x, A, B, scaling):
        if recompute.keeping():  # a selective-checkpointing tape replays the base product on its own
            return None
        y = dispatch.lora_linear_4bit(x.reshape(-1, self.shape[1]), self.quant_state, A, B, scaling)
        return None if y is None else y.view(*x.shape[:-1], self.shape[0])

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_cached(self.quant_state, dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.quant_state, dtype)

    def own_keys(self, state_dict, prefix):
        return [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]

    def read_state(self, tensors, prefix):
        return QuantState.from_state_dict(tensors, prefix + "weight")

    def state_dict_of(self, prefix):
        return self.quant_state.to_state_dict(prefix + "weight")

    def codes_key(self, prefix):
        return prefix + "weight"

    def to_sharded(self, dtype: torch.dtype) -> "ShardedQuant4bitBase":
        return ShardedQuant4bitBase(self.quant_state, dtype)


class ShardedQuant4bitBase(Quant4bitBase):
    """The 4-bit codes and absmax held as frozen 1-D Parameters `weight` and `weight_absmax` of a
    float dtype whose bytes are theirs, zero-padded to a whole element: what FSDP can shard (dim 0)
    and all-gather, as bitsandbytes' `bnb_4bit_quant_storage` does. Nothing computes on these
    floats; the codes are viewed back as uint8. Checkpoint keys and bytes stay bitsandbytes'.

    FSDP swaps the registered Parameters between this rank's shard and the gathered whole, so the
    QuantState is rebuilt from them where it is used; while only a shard is registered (outside
    forward and backward) its `packed` and `absmax` are None."""

    shardable = False

    def __init__(self, state: QuantState, dtype: torch.dtype):
        FrozenBase.__init__(self, state.shape)
        self.storage_dtype = dtype
        self._sizes = (state.packed.numel(), state.absmax.dtype, state.absmax.numel())
        self._full: QuantState | None = state  # until registered on a host
        self._constants = dataclasses.replace(state, packed=None, absmax=None)

    def register(self, host: nn.Module) -> None:
        if "weight" in host._buffers:
            del host._buffers["weight"]
        if self.host is not None:  # a second host: the same Parameters (sharded or whole)
            host.weight, host.weight_absmax = self.host.weight, self.host.weight_absmax
            return
        state, self._full = self._full, None
        host.weight = nn.Parameter(bytes_as(state.packed, self.storage_dtype), requires_grad=False)
        host.weight_absmax = nn.Parameter(bytes_as(state.absmax, self.storage_dtype), requires_grad=False)

    @property
    def quant_state(self) -> QuantState:
        if self._full is not None:
            return self._full
        weight, absmax = self.host.weight, self.host.weight_absmax
        if is_sharded(weight):
            return self._constants
        n_packed, absmax_dtype, n_absmax = self._sizes
        absmax_bytes = n_absmax * absmax_dtype.itemsize
        return dataclasses.replace(self._constants,
                                   packed=weight.detach().view(torch.uint8)[:n_packed].view(-1, 1),
                                   absmax=absmax.detach().view(torch.uint8)[:absmax_bytes].view(absmax_dtype))

    def save_state(self, destination: dict, prefix: str) -> None:
        state = self.quant_state
        if state.packed is None:  # a shard: FSDP's sharded form, keys as registered
            return
        destination.pop(prefix + "weight_absmax", None)
        destination.update(state.to_state_dict(prefix + "weight"))

    def load_state(self, state_dict, prefix, strict, missing_keys, error_msgs) -> None:
        if any(k.startswith(prefix + "weight.") for k in state_dict):
            error_msgs.append(f"{prefix}weight: load the 4-bit state before sharding the base")

    def to_sharded(self, dtype: torch.dtype) -> "ShardedQuant4bitBase":
        raise ValueError("the 4-bit base is in its sharded storage already")

    def moved(self) -> None:  # the codes moved with the Parameters; move the constants
        self._constants = self._constants.to(self.host.weight.device)

    def held_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(this rank's local tensor, the whole tensor) for the codes and the absmax."""
        return [(p.to_local() if is_sharded(p) else p, p) for p in (self.host.weight, self.host.weight_absmax)]


def bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t's bytes as a 1-D tensor of `dtype`, zero-padded at the end to a whole number of elements."""
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    pad = -raw.numel() % dtype.itemsize
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(dtype).clone()


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (FSDP's sharded parameter), whose bytes are not the whole tensor's."""
    return hasattr(t, "_local_tensor")
