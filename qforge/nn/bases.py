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

The products go through autograd Functions that save nothing for backward but a reference to the
frozen weight: backward dequantises again rather than keep a dense copy alive between the two.
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


class Linear4bitFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T. Saves nothing but a reference to the packed state; the chain rule
    dL/dx = dL/dy @ dequant(W) dequantises again. W is frozen, so there is no dL/dW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: QuantState, key: object) -> torch.Tensor:
        ctx.state = state
        # inside a selectively checkpointed layer's recomputation: the output kept from forward
        return recompute.base_product(key, x, state.shape[0], lambda: dispatch.matmul_4bit(
            x, state, lambda dtype: dequantize_cached(state, dtype), transposed=True))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        state = ctx.state
        return dispatch.matmul_4bit(grad_out, state, lambda dtype: dequantize_cached(state, dtype),
                                    transposed=False), None, None


class DenseFunction(torch.autograd.Function):
    """y = x @ W^T for a frozen dense W: what F.linear computes, with the same selective-checkpointing
    tape as the 4-bit product so BF16 LoRA and QLoRA runs compare fairly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, key: object) -> torch.Tensor:
        ctx.weight = weight  # frozen: held, not saved, so checkpointing's early stop works as for 4 bits
        return recompute.base_product(key, x, weight.shape[0], lambda: F.linear(x, weight))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.weight.to(grad_out.dtype), None, None


class FrozenBase:
    """What an AdaptedLinear asks of its frozen weight. `attach` registers the base's tensors on the
    layer (`host`); the hooks below are called from the layer's own state-dict and device methods."""

    kind = "base"
    shardable = False  # True: qforge.dist can swap it for a sharded form (to_sharded)

    def __init__(self, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.host: nn.Module | None = None

    def attach(self, host: nn.Module) -> None:
        self.host = host
        self.register(host)

    # ---- what each base provides --------------------------------------------------------------
    def register(self, host: nn.Module) -> None:
        raise NotImplementedError

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        host.weight = nn.Parameter(self._initial, requires_grad=False)
        self._initial = None

    def product(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.host.weight
        weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if weight.requires_grad:  # a trainable base (not qforge's LoRA): plain autograd
                return F.linear(x, weight)
            return DenseFunction.apply(x, weight, self.host)
        return F.linear(x, weight)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.host.weight.to(dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.host.weight.detach().to(dtype).clone()


class Quant4bitBase(FrozenBase):
    """NF4 / FP4 codes in bitsandbytes' layout: the host's non-persistent uint8 buffer `weight`
    [(out*in+1)//2, 1] is the packed codes (as in bitsandbytes' Linear4bit); the state dict carries
    bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`, ...)."""

    shardable = True

    def __init__(self, state: QuantState):
        super().__init__(state.shape)
        self.quant_state = state

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

    def register(self, host: nn.Module) -> None:
        host.register_buffer("weight", self.quant_state.packed, persistent=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return Linear4bitFunction.apply(x, self.quant_state, self.host)

    def fused_lora(self, x, A, B, scaling):
        if recompute.keeping():  # a selective-checkpointing tape replays the base product on its own
            return None
        y = dispatch.lora_linear_4bit(x.reshape(-1, self.shape[1]), self.quant_state, A, B, scaling)
        return None if y is None else y.view(*x.shape[:-1], self.shape[0])

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_cached(self.quant_state, dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.quant_state, dtype)

    def save_state(self, destination: dict, prefix: str) -> None:
        destination.update(self.quant_state.to_state_dict(prefix + "weight"))

    def load_state(self, state_dict, prefix, strict, missing_keys, error_msgs) -> None:
        own = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if not own:
            if strict:
                missing_keys.append(prefix + "weight")
            return
        try:
            state = QuantState.from_state_dict({k: state_dict[k] for k in own}, prefix + "weight")
        except ValueError as exc:
            error_msgs.append(str(exc))
        else:
            if tuple(state.shape) != self.shape:
                error_msgs.append(f"{prefix}weight: shape {list(state.shape)} does not fit {list(self.shape)}")
            else:
                self.quant_state = state.to(self.host.weight.device)
                self.host.weight = self.quant_state.packed
        for k in own:
            state_dict.pop(k)

    def moved(self) -> None:
        device = self.host.weight.device
        if self.quant_state.packed.device != device:
            self.quant_state = self.quant_state.to(device)
            self.host.weight = self.quant_state.packed

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
