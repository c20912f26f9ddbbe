"""QLoRALinear: a frozen 4-bit base weight plus trainable LoRA / DoRA adapters.

    y = dequant(W) x + bias + s * B(A(dropout(x)))            (LoRA, s = alpha/r or alpha/sqrt(r))
    y = (m / ||W + s B A||_row) * (dequant(W) x + s B A x) + bias      (DoRA, the norm detached)

The base product runs through `Linear4bitFunction`, which keeps no dequantised weight between
forward and backward: backward dequantises again. State-dict keys are bitsandbytes' (`weight`,
`weight.absmax`, ...), so a model's state dict is a 4-bit checkpoint.

For sharded training (qforge.dist) a layer can keep its codes in a float storage
(`use_float_storage`): the same bytes, held by frozen 1-D Parameters that FSDP shards and gathers.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantState, dequantize, quantize
from . import recompute
from .lora import LoraAdapter, LoraSpec

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
    def forward(ctx, x: torch.Tensor, state: QuantState, key: object = None) -> torch.Tensor:
        ctx.state = state
        # inside a selectively checkpointed layer's recomputation: the output kept from forward
        # (key: what identifies the layer there; its module)
        return recompute.base_product(key if key is not None else state, x, state.shape[0],
                                      lambda: F.linear(x, dequantize_cached(state, x.dtype)))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ dequantize_cached(ctx.state, grad_out.dtype), None, None


class DenseBaseFunction(torch.autograd.Function):
    """y = x @ W^T for a frozen dense W (LoRALinear's base): what F.linear computes, with the same
    selective-checkpointing tape as the 4-bit product so BF16 LoRA and QLoRA runs compare fairly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, key: object = None) -> torch.Tensor:
        ctx.weight = weight  # frozen: held, not saved, so checkpointing's early stop works as for 4 bits
        return recompute.base_product(key if key is not None else weight, x, weight.shape[0],
                                      lambda: F.linear(x, weight))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.weight.to(grad_out.dtype), None, None


class QLoRALinear(nn.Module):
    """A 4-bit replacement for nn.Linear with named adapters.

    `weight` is the packed uint8 buffer [(out*in+1)//2, 1] (as bitsandbytes' Linear4bit); the rest
    of the quantisation state lives in `quant_state`. One adapter is active (`active_adapter`), or
    a per-row adapter index (`set_row_adapters`) selects an adapter for each row of a batch.
    """

    def __init__(self, state: QuantState, bias: torch.Tensor | None, compute_dtype=torch.bfloat16):
        super().__init__()
        out_features, in_features = state.shape
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self._storage: tuple | None = None  # set by use_float_storage
        self.quant_state = state
        self.register_buffer("weight", state.packed, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._row_index: torch.Tensor | None = None
        self._row_names: list[str] = []

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type="nf4", blocksize=64, double_quant=True,
                    compute_dtype=torch.bfloat16) -> "QLoRALinear":
        state = quantize(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls(state, linear.bias, compute_dtype)

    def extra_repr(self) -> str:
        st = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={st.quant_type}, blocksize={st.blocksize}, double_quant={st.nested}, "
                f"adapters={list(self.adapters)}, active={self.active_adapter}")

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec) -> LoraAdapter:
        adapter = LoraAdapter(self.in_features, self.out_features, spec).to(self.weight.device)
        if spec.use_dora:
            with torch.no_grad():
                adapter.magnitude.copy_(self.base_weight_fp32().norm(dim=1))
        self.adapters[name] = adapter
        self.active_adapter = self.active_adapter or name
        return adapter

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh dequantised copy of the base weight [out, in] (not the shared workspace)."""
        return dequantize(self.quant_state, dtype or self.compute_dtype)

    def set_row_adapters(self, index: torch.Tensor | None, names: list[str] | None = None) -> None:
        """Per-row adapters: row b uses adapter names[index[b]], or none where index[b] < 0."""
        self._row_index = index
        self._row_names = list(names or [])

    # ---- forward --------------------------------------------------------------------------
    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without bias, W the frozen base weight. (..., in) -> (..., out)."""
        return Linear4bitFunction.apply(x, self.quant_state, self)

    def base_weight_fp32(self) -> torch.Tensor:
        """The base weight in float32 [out, in]; may be a shared workspace (use it at once)."""
        return dequantize_cached(self.quant_state, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.to(self.compute_dtype)
        if self._row_index is not None:
            base = self.base_product(x_c)  # (..., out), no bias yet
            return self._finish(base + self._mixed_delta(x_c, base), x)
        adapter = self.adapters[self.active_adapter] if self.active_adapter in self.adapters else None
        if adapter is None:
            return self._finish(self.base_product(x_c), x)
        if adapter.use_dora:
            base = self.base_product(x_c)
            return self._finish(base + self._adapter_delta(adapter, x_c, base), x)
        if recompute.full_recomputation() or not adapter.fusable(self.compute_dtype):
            # The low-rank branch first, the frozen base product last: the base product saves no
            # tensor for backward, so when full checkpointing recomputes a block, its
            # recomputation stops (torch's early stop) after the last saved tensor and skips the
            # block's final base product (down_proj's), which backward does not need.
            lora = adapter.low_rank(x_c)
            return self._finish(self.base_product(x_c) + lora.to(self.compute_dtype), x)
        # Otherwise (no checkpointing, selective checkpointing whose recomputation replays the base
        # product, inference) the base product first and B's product added onto it by one addmm,
        # the scaling applied to the rank-r factor: no (rows, out) passes for the scaling and the sum.
        base = self.base_product(x_c)
        h = adapter.scaled_down(x_c)                                                  # (..., r)
        out = torch.addmm(base.reshape(-1, self.out_features), h.reshape(-1, adapter.r), adapter.lora_B.weight.t())
        return self._finish(out.view(base.shape), x)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add the bias. Under autocast the result stays in the compute dtype, as nn.Linear's does;
        otherwise it goes back to the input's dtype. (Returning the input's dtype under autocast,
        as bitsandbytes' Linear4bit does, lets the float32 norms of a k-bit model turn the whole
        residual stream into float32: on SmolLM2 that cost ~150-300 MB of activations and a
        slower step than BF16 LoRA.)"""
        if self.bias is not None:
            out = out + self.bias
        if not x.dtype.is_floating_point or torch.is_autocast_enabled(x.device.type):
            return out
        return out.to(x.dtype)

    def _adapter_delta(self, adapter: LoraAdapter, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """What adapter adds to the bias-free base output `base` for inputs x."""
        lora = adapter.low_rank(x).to(base.dtype)
        if not adapter.use_dora:
            return lora
        with torch.no_grad():  # DoRA's norm is treated as a constant (DoRA paper, section 4.3)
            w = self.base_weight_fp32() + adapter.delta_weight()
            norm = w.norm(dim=1)
        scale = (adapter.magnitude.float() / norm).to(base.dtype)
        return (scale - 1) * base + scale * lora

    def _mixed_delta(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Per-row adapters as gathered products: the adapters in this batch are concatenated along
        the rank (A: (R, in), B pre-scaled: (out, R)); every row is multiplied by all the A's at
        once, masked down to its own adapter's columns, then multiplied by B. No per-row weight
        copies. x: (B, T, in) or (B, in); index: (B,), < 0 for no adapter."""
        index, names = self._row_index.to(x.device), self._row_names
        adapters = [self.adapters[n] if n in self.adapters else None for n in names]
        if any(a is not None and a.use_dora for a in adapters):
            return self._grouped_delta(x, base, index, adapters)
        present = [(k, a) for k, a in enumerate(adapters) if a is not None]
        if not present:
            return torch.zeros_like(base)
        dt = x.dtype
        A = torch.cat([a.lora_A.weight.to(dt) for _, a in present])                       # (R, in)
        B = torch.cat([a.lora_B.weight.to(dt) * a.scaling for _, a in present], dim=1)    # (out, R)
        owner = torch.cat([torch.full((a.r,), k, device=x.device) for k, a in present])   # (R,)
        mask = (index[:, None] == owner[None, :]).to(dt)                                   # (B, R)
        h = x @ A.T                                                                        # (B, [T,] R)
        h = h * (mask[:, None, :] if x.dim() == 3 else mask)
        return h @ B.T                                                                     # (B, [T,] out)

    def _grouped_delta(self, x, base, index, adapters):
        delta = torch.zeros_like(base)
        for k, a in enumerate(adapters):
            rows = (index == k).nonzero().flatten()
            if a is not None and rows.numel():
                delta[rows] = self._adapter_delta(a, x[rows], base[rows])
        return delta

    # ---- float storage for FSDP -------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState | None:
        """The quantisation state. Under float storage its codes and absmax are views of the
        registered Parameters `weight` and `weight_absmax`, which FSDP swaps between this rank's
        shard and the gathered whole: read it where it is used. While only a shard is registered
        (outside forward and backward) `packed` and `absmax` are None."""
        state = self.__dict__.get("_quant_state")
        if self.__dict__.get("_storage") is None:
            return state
        n_packed, absmax_dtype, n_absmax = self._storage
        weight, absmax = self.weight, self.weight_absmax
        if is_sharded(weight):
            return state
        absmax_bytes = n_absmax * absmax_dtype.itemsize
        return dataclasses.replace(state, packed=weight.detach().view(torch.uint8)[:n_packed].view(-1, 1),
                                   absmax=absmax.detach().view(torch.uint8)[:absmax_bytes].view(absmax_dtype))

    @quant_state.setter
    def quant_state(self, state: QuantState | None) -> None:
        self.__dict__["_quant_state"] = state

    def use_float_storage(self, dtype: torch.dtype) -> None:
        """Hold the packed codes and absmax as frozen 1-D Parameters of float `dtype` whose bytes are
        theirs, zero-padded to a whole element: what FSDP can shard (dim 0) and all-gather, as
        bitsandbytes' `bnb_4bit_quant_storage` does. Nothing ever computes on these floats; the
        codes are viewed back as uint8. Checkpoint keys and bytes stay bitsandbytes'."""
        state = self.quant_state
        if self._storage is not None:
            raise ValueError("use_float_storage: the layer already holds its codes in a float storage")
        del self.weight  # the uint8 buffer
        self.weight = nn.Parameter(bytes_as(state.packed, dtype), requires_grad=False)
        self.weight_absmax = nn.Parameter(bytes_as(state.absmax, dtype), requires_grad=False)
        self._storage = (state.packed.numel(), state.absmax.dtype, state.absmax.numel())
        self.__dict__["_quant_state"] = dataclasses.replace(state, packed=None, absmax=None)

    # ---- state dict: bitsandbytes' keys ---------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.quant_state
        if state.packed is None:  # a shard of the float storage: FSDP's sharded form, keys as registered
            return
        destination.pop(prefix + "weight_absmax", None)
        destination.update(state.to_state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if own:
            try:
                state = QuantState.from_state_dict({k: state_dict[k] for k in own}, prefix + "weight")
            except ValueError as exc:
                error_msgs.append(str(exc))
            else:
                if tuple(state.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{prefix}weight: shape {list(state.shape)} does not fit "
                                      f"[{self.out_features}, {self.in_features}]")
                elif self._storage is not None:
                    error_msgs.append(f"{prefix}weight: load the 4-bit state before use_float_storage")
                else:
                    self.quant_state = state.to(self.weight.device)
                    self.weight = self.quant_state.packed
            for k in own:
                state_dict.pop(k)
        elif strict:
            missing_keys.append(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.weight.device
        if self._storage is not None:  # the codes moved with the Parameters; move the constants
            self.__dict__["_quant_state"] = self.__dict__["_quant_state"].to(device)
        elif self.quant_state.packed.device != device:
            self.quant_state = self.quant_state.to(device)
            self.weight = self.quant_state.packed
        return self


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


class LoRALinear(QLoRALinear):
    """The same adapters on an unquantised frozen base (BF16 LoRA), so QLoRA and LoRA runs differ
    only in the base product. `weight` is an ordinary frozen parameter [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype=torch.bfloat16):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self._storage = None
        self.quant_state = None
        self.weight = nn.Parameter(weight.detach().to(compute_dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.adapters = nn.ModuleDict()
        self.active_adapter = None
        self._row_index, self._row_names = None, []

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.bfloat16) -> "LoRALinear":
        return cls(linear.weight, linear.bias, compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"adapters={list(self.adapters)}, active={self.active_adapter}")

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if weight.requires_grad:  # a trainable base (not qforge's LoRA): plain autograd
                return F.linear(x, weight)
            return DenseBaseFunction.apply(x, weight, self)
        return F.linear(x, weight)

    def base_weight_fp32(self) -> torch.Tensor:
        return self.weight.float()

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.detach().to(dtype or self.compute_dtype).clone()

    # plain nn.Module state dict and device moves
    _save_to_state_dict = nn.Module._save_to_state_dict
    _load_from_state_dict = nn.Module._load_from_state_dict
    _apply = nn.Module._apply
