"""Mixture-of-experts layers with adapters: transformers' fused expert parameters held in 4 bits per
expert (QLoRA) or dense and frozen (BF16 LoRA), with per-expert LoRA in PEFT's `target_parameters`
layout.

transformers 5.x keeps an MoE layer's experts as two fused 3-D parameters (Mixtral, Qwen2/3-MoE):
    gate_up_proj [E, 2I, H]    expert e: [gate; up] = W_gu[e] x
    down_proj    [E, H, I]     expert e: y = W_d[e] (act(gate) * up)
and the sparse block calls `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`.

    hidden --router (frozen, BF16, untouched)--> top_k_index, top_k_weights
       |
       +-- for each expert e the batch routes to (no other expert is dequantised):
             x_e = hidden[tokens routed to e]                               (n_e, H)
             h   = x_e W_gu[e]^T + s (x_e A_gu[e]^T) B_gu[e]^T                (n_e, 2I)
             a   = act(h[:, :I]) * h[:, I:]                                 (n_e, I)
             y_e = a W_d[e]^T + s (a A_d[e]^T) B_d[e]^T                      (n_e, H)
             out[tokens] += weight * y_e

Each expert slice W[e] is quantised on its own exactly as bitsandbytes' quantize_4bit quantises a
2-D weight (blockwise NF4/FP4 over the flattened slice, optional double quantisation with the
slice's own offset), and the slices are stacked: packed codes [E, (d1*d2+1)//2] uint8, absmax
[E, blocks], nested absmax [E, nested blocks], offsets [E]. A slice is dequantised into a
shared workspace for one product and dropped; the products go through the one frozen-product
Function (qforge.nn.functions: nothing saved for backward, which dequantises again; the
selective-checkpointing tape of qforge.nn.recompute), as the Linear bases' do. A bank is the
experts' frozen base taking an expert index (FrozenBank: ExpertBank 4 bits, DenseExpertBank a
plain tensor), as a FrozenBase is a linear layer's.

PEFT 0.21 (ParamWrapper) keeps an expert adapter as lora_A [E*r, in] (expert-major rows) and
lora_B [out, r*E] (column j*E + e is rank j of expert e); here they are held as A [E, r, in] and
B [E, out, r] and converted by `peft_factors` / `from_peft_factors`. As in PEFT, expert adapters
have no dropout and no DoRA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch
from ..quant import QuantState, quantize
from .bases import dequantize_cached
from .functions import frozen_product
from .lora import LoraSpec, low_rank

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # in the order transformers registers them


class FrozenBank:
    """The frozen base of a fused expert parameter [E, out, in]: a linear base's product protocol
    with an expert index. `product(x, e)` is expert e's x @ W[e]^T through the one frozen-product Function
    (qforge.nn.functions), whose operand is the index: `matmul(e, x, transposed)` makes W[e] again
    in backward. Its tensors are registered by the host (AdaptedExperts) under the parameter's
    name plus the suffixes of `tensors()`, and handed back after a move or load (`replace_tensors`)."""

    num_experts: int
    keys: list  # the recompute tape's identity per expert
    sharded = False  # True: its tensors are float storage FSDP shards (qforge.nn.sharded_experts)

    @property
    def shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def product(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [n, in] @ W[e]^T -> [n, out], differentiable in x only."""
        return frozen_product(x, self, e, self.keys[e], self.shape[1])

    def matmul(self, e: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        """x @ W[e]^T (x [n, in] -> [n, out]) or, transposed=False, x @ W[e] ([n, out] -> [n, in])."""
        raise NotImplementedError


class ExpertBank(FrozenBank):
    """One fused expert parameter [E, out, in] held as E per-expert 4-bit QuantStates whose
    tensors are views into stacked storage (`tensors()`): what a host module registers."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                 offsets: torch.Tensor | None, template: QuantState):
        self.packed, self.absmax, self.nested_absmax, self.offsets = packed, absmax, nested_absmax, offsets
        self.template = template  # shape [out, in], dtype, blocksize, quant_type, codebooks (one expert's)
        self.num_experts = packed.shape[0]
        self.keys = [object() for _ in range(self.num_experts)]  # the recompute tape's identity per expert
        self._states = None
        self._offset_values: list | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_experts, *self.template.shape)

    @classmethod
    def quantize(cls, weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True) -> "ExpertBank":
        """weight [E, out, in] (float) -> its bank, each expert quantised as bitsandbytes would quantise
        weight[e]. One expert at a time: the transient float copies are one slice's."""
        if weight.dim() != 3:
            raise ValueError(f"expert parameter must be 3-D [experts, out, in], got shape {list(weight.shape)}")
        return cls.from_states([quantize(weight[e].detach(), quant_type, blocksize, double_quant)
                                for e in range(weight.shape[0])])

    @classmethod
    def from_states(cls, states: list[QuantState]) -> "ExpertBank":
        """The bank of per-expert states (one expert's as bitsandbytes stores a 4-bit weight); all
        must share shape, dtype, blocksize, quant type and nesting."""
        first = states[0]
        kinds = {(tuple(s.shape), s.dtype, s.blocksize, s.quant_type, s.nested, s.nested_blocksize) for s in states}
        if len(kinds) != 1:
            raise ValueError(f"expert states differ in shape, dtype, blocksize, quant type or nesting: {sorted(kinds)}")
        nested = first.nested
        return cls(torch.stack([s.packed.view(-1) for s in states]),
                   torch.stack([s.absmax for s in states]),
                   torch.stack([s.nested_absmax for s in states]) if nested else None,
                   torch.tensor([s.offset for s in states], dtype=torch.float32, device=first.packed.device)
                   if nested else None,
                   QuantState(None, None, first.shape, first.dtype, first.blocksize, first.quant_type, first.code,
                              None, first.nested_code, first.nested_blocksize, None, first.nested_dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Suffix -> stacked tensor, for registering as buffers ('' is the packed codes)."""
        out = {"": self.packed, "_absmax": self.absmax}
        if self.nested_absmax is not None:
            out.update({"_nested_absmax": self.nested_absmax, "_offset": self.offsets})
        return out

    def expert_state_dicts(self, prefix: str) -> dict[str, torch.Tensor]:
        """The bank as a folder stores it: expert e under `{prefix}.{e}` in bitsandbytes' keys of one
        4-bit weight (codes, absmax, quant_map, nested_*, quant_state.bitsandbytes__<type>)."""
        out = {}
        for e in range(self.num_experts):
            out.update({k: v.clone() for k, v in self.expert(e).to_state_dict(f"{prefix}.{e}").items()})
        return out

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """After the host's buffers moved or were loaded: take them (same suffixes as tensors())."""
        self.packed, self.absmax = tensors[""], tensors["_absmax"]
        self.nested_absmax, self.offsets = tensors.get("_nested_absmax"), tensors.get("_offset")
        device = self.packed.device
        t = self.template
        self.template = QuantState(None, None, t.shape, t.dtype, t.blocksize, t.quant_type, t.code.to(device),
                                   None, None if t.nested_code is None else t.nested_code.to(device),
                                   t.nested_blocksize, None, t.nested_dtype)
        self._states = self._offset_values = None

    def offset_values(self) -> list:
        """The per-expert offsets as Python floats (None each without double quantisation): read
        from the tensor once (a device sync), kept until the tensors are replaced."""
        if self._offset_values is None:
            self._offset_values = self.offsets.tolist() if self.offsets is not None else [None] * self.num_experts
        return self._offset_values

    def expert(self, e: int) -> QuantState:
        """Expert e's QuantState (views of the stacked tensors): bitsandbytes' state of weight[e]."""
        if self._states is None:
            t = self.template
            offsets = self.offset_values()
            self._states = [QuantState(self.packed[i].view(-1, 1), self.absmax[i], t.shape, t.dtype, t.blocksize,
                                       t.quant_type, t.code,
                                       None if self.nested_absmax is None else self.nested_absmax[i],
                                       t.nested_code, t.nested_blocksize, offsets[i], t.nested_dtype)
                            for i in range(self.num_experts)]
        return self._states[e]

    def dequantize_expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's weight [out, in] in a transient workspace (use at once)."""
        return dequantize_cached(self.expert(e), dtype)

    def matmul(self, e: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        return dispatch.matmul_4bit(x, self.expert(e), lambda dtype: self.dequantize_expert(e, dtype), transposed)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A fresh copy of the whole parameter [E, out, in]."""
        return torch.stack([self.dequantize_expert(e, dtype).clone() for e in range(self.num_experts)])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def keeps_dtype(self) -> bool:
        """True: a dtype cast of the host must not touch these tensors (the float32 scales)."""
        return True


class DenseExpertBank(FrozenBank):
    """One fused expert parameter [E, out, in] kept dense and frozen (BF16 LoRA on experts): the
    same questions as ExpertBank, answered from a plain tensor."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()
        self.num_experts = weight.shape[0]
        self.keys = [object() for _ in range(self.num_experts)]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"": self.weight}

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.weight = tensors[""]

    def dequantize_expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[e].to(dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype).clone()

    def matmul(self, e: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        w = self.dequantize_expert(e, x.dtype)
        return F.linear(x, w) if transposed else x @ w

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def keeps_dtype(self) -> bool:
        return False


class ExpertLora(nn.Module):
    """Per-expert LoRA on one expert parameter [E, out, in]: A [E, r, in], B [E, out, r] (B = 0 at
    the start), delta W[e] = s B[e] A[e]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, spec: LoraSpec):
        super().__init__()
        self.spec, self.r, self.scaling = spec, spec.r, spec.scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, spec.r, in_features, dtype=spec.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, spec.r, dtype=spec.dtype))
        for a in self.lora_A.data:  # PEFT's init of its [E*r, in] Linear: the same bound for every row
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def low_rank(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """s (x A[e]^T) B[e]^T in the adapter's dtype: [n, in] -> [n, out] (the layers' low-rank helper)."""
        return low_rank(x.to(self.lora_A.dtype), self.lora_A[e], self.lora_B[e], self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s B[e] @ A[e] for every expert, float32 [E, out, in]."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def peft_factors(self) -> dict[str, torch.Tensor]:
        """PEFT's lora_A.weight [E*r, in] and lora_B.weight [out, r*E] (column j*E + e)."""
        E, r, n_in = self.lora_A.shape
        return {"lora_A.weight": self.lora_A.detach().reshape(E * r, n_in),
                "lora_B.weight": self.lora_B.detach().permute(1, 2, 0).reshape(-1, r * E)}

    @torch.no_grad()
    def from_peft_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        E, r, n_in = self.lora_A.shape
        self.lora_A.copy_(lora_A.reshape(E, r, n_in))
        self.lora_B.copy_(lora_B.reshape(lora_B.shape[0], r, E).permute(2, 0, 1))


class AdaptedExperts(nn.Module):
    """A transformers fused-experts module whose two expert parameters are frozen banks (4-bit or
    dense) with named per-expert adapters:
    forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].

    A bank's tensors are buffers named after the parameter (4 bits: `gate_up_proj` (codes),
    `gate_up_proj_absmax`, `gate_up_proj_nested_absmax`, `gate_up_proj_offset`; dense:
    `gate_up_proj`; likewise for `down_proj`), so the module's state dict round-trips. A bank may
    be set later (`set_bank`), as a streaming loader places one parameter at a time."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.compute_dtype = compute_dtype
        self.banks: dict[str, ExpertBank | DenseExpertBank] = {}
        # the order transformers' module registers its parameters in: PEFT nests its ParamWrappers so
        self.parameter_order: tuple[str, ...] = EXPERT_PARAMETERS
        self.adapters = nn.ModuleDict()  # adapter name -> ModuleDict(parameter name -> ExpertLora)
        self.active_adapter: str | None = None

    def expected_shape(self, name: str) -> tuple[int, int, int]:
        E, H, I = self.num_experts, self.hidden_dim, self.intermediate_dim
        shapes = {"gate_up_proj": (E, 2 * I, H), "down_proj": (E, H, I)}
        if name not in shapes:
            raise ValueError(f"unknown expert parameter '{name}'; expected one of {EXPERT_PARAMETERS}")
        return shapes[name]

    @classmethod
    def like(cls, experts: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedExperts":
        """An empty module shaped as transformers' `experts` (banks set later)."""
        check_supported(experts)
        E, two_i, H = experts.gate_up_proj.shape
        module = cls(E, H, two_i // 2, experts.act_fn, compute_dtype)
        module.parameter_order = tuple(n for n, _ in experts.named_parameters(recurse=False) if n in EXPERT_PARAMETERS)
        return module

    @classmethod
    def quantized(cls, experts: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedExperts":
        """transformers' fused `experts` module with its weights quantised, one parameter at a time."""
        module = cls.like(experts, compute_dtype)
        for name in EXPERT_PARAMETERS:
            module.set_bank(name, ExpertBank.quantize(getattr(experts, name), quant_type, blocksize, double_quant))
        return module

    @classmethod
    def dense(cls, experts: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> "AdaptedExperts":
        """transformers' fused `experts` module with its weights kept dense (frozen, in compute_dtype)."""
        module = cls.like(experts, compute_dtype)
        for name in EXPERT_PARAMETERS:
            module.set_bank(name, DenseExpertBank(getattr(experts, name).detach().to(compute_dtype)))
        return module

    def set_bank(self, name: str, bank: ExpertBank | DenseExpertBank) -> None:
        if tuple(bank.shape) != self.expected_shape(name):
            raise ValueError(f"expert parameter '{name}' has shape {list(bank.shape)}, "
                             f"expected {list(self.expected_shape(name))}")
        for suffix, t in bank.tensors().items():
            self.register_buffer(name + suffix, t)
        self.banks[name] = bank

    def bank(self, name: str) -> ExpertBank | DenseExpertBank:
        if name not in self.banks:
            raise ValueError(f"expert parameter '{name}' of this layer was never loaded")
        return self.banks[name]

    def extra_repr(self) -> str:
        t = getattr(next(iter(self.banks.values()), None), "template", None)
        quant = f", quant_type={t.quant_type}, blocksize={t.blocksize}, double_quant={t.nested_code is not None}" \
            if t is not None else ""
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}{quant}, active={self.active_adapter}")

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec | dict[str, LoraSpec],
                    parameters=EXPERT_PARAMETERS) -> nn.ModuleDict:
        """Adapter `name` on the expert parameters named in `parameters` (`spec`: one for all, or
        one per parameter name). No dropout: as in PEFT, whose ParamWrapper refuses any."""
        specs = spec if isinstance(spec, dict) else {p: spec for p in parameters}
        if any(s.use_dora for s in specs.values()):
            raise ValueError("DoRA is not supported on expert parameters (nor by PEFT's target_parameters); "
                             "target linear layers only")
        loras = nn.ModuleDict()
        for pname in self.parameter_order:  # PEFT nests its wrappers in this order
            if pname in parameters:
                E, out_f, in_f = self.expected_shape(pname)
                loras[pname] = ExpertLora(E, in_f, out_f, specs[pname])
        bank_tensors = [t for bank in self.banks.values() for t in bank.tensors().values()]
        device = bank_tensors[0].device if bank_tensors else torch.device("cpu")
        self.adapters[name] = loras.to(device)
        self.active_adapter = self.active_adapter or name
        return loras

    def dequantized(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A fresh dense copy of expert parameter `name` [E, out, in]."""
        return self.bank(name).dequantized(dtype)

    @torch.no_grad()
    def merged_weight(self, name: str, adapter: str | None) -> torch.Tensor:
        """float32 [E, out, in]: the dequantised parameter plus adapter `adapter`'s s B[e] A[e]
        (the parameter alone when the adapter does not target it)."""
        w = self.dequantized(name, torch.float32)
        loras = self.adapters[adapter] if adapter in self.adapters else {}
        return w + loras[name].delta_weight().to(w.device) if name in loras else w

    # ---- forward --------------------------------------------------------------------------
    def project(self, name: str, e: int, x: torch.Tensor, loras) -> torch.Tensor:
        """Expert e's product with parameter `name` (+ its low-rank term): x [n, in] -> [n, out]."""
        lora = loras[name] if loras is not None and name in loras else None
        # the low-rank term first and the frozen product last (see AdaptedLinear.forward: under full
        # checkpointing, torch's early stop skips recomputing the final base product)
        low = None if lora is None else lora.low_rank(e, x)
        y = self.bank(name).product(x, e)
        return y if low is None else y + low.to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.compute_dtype)                                     # (T, H)
        out = torch.zeros_like(hidden_states)
        loras = self.adapters[self.active_adapter] if self.active_adapter in self.adapters else None
        with torch.no_grad():
            routed = torch.unique(top_k_index).tolist()  # only these experts are dequantised
        for e in routed:
            if not 0 <= e < self.num_experts:  # transformers' expert-parallel sentinel: not ours
                continue
            token_idx, k_pos = torch.where(top_k_index == e)
            h = self.project("gate_up_proj", e, x[token_idx], loras)                 # (n_e, 2I)
            gate, up = h.chunk(2, dim=-1)
            y = self.project("down_proj", e, self.act_fn(gate) * up, loras)          # (n_e, H)
            y = y * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    # ---- state dict and device moves ------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # a dtype cast (model.to(torch.bfloat16), .half()) must not round the float32 scales: such
        # a buffer keeps its dtype and only follows the move
        # a buffer keeps its dtype and only follows the move; so do the float storage Parameters of
        # a sharded bank, whose bytes are codes, not floats
        before = {k: t for k, t in self._buffers.items() if t is not None and self._owns(k)}
        stored = {k: p.data for k, p in self._parameters.items() if p is not None and self._owns(k)}
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        for k, old in stored.items():
            p = self._parameters[k]
            if p.dtype != old.dtype:
                p.data = old.to(p.device)
        self._rebind()
        return self

    def _owns(self, key: str) -> bool:
        return any(key == name + suffix for name, bank in self.banks.items() if bank.keeps_dtype()
                   for suffix in bank.tensors())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, bank in self.banks.items():  # a gathered sharded bank: the keys' original tensors
            original = bank.original_tensors() if bank.sharded else None
            if original is not None:
                destination.update({prefix + name + suffix: t for suffix, t in original.items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, bank in self.banks.items():
            if bank.sharded:
                storage_of(bank, state_dict, prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebind()

    def _rebind(self) -> None:
        """Point each bank at the (moved or loaded) registered buffers (a sharded bank reads its
        host's Parameters at each use)."""
        for name, bank in self.banks.items():
            if bank.sharded:
                bank.replace_tensors({})
            else:
                bank.replace_tensors({suffix: self._buffers[name + suffix] for suffix in bank.tensors()})


def storage_of(bank, state_dict: dict, key: str) -> None:
    """In `state_dict`, replace a sharded bank's tensors saved in their original form (uint8 codes
    [E, P], float32 absmax, ...) by the bank's float storage of the same bytes, so that the whole
    bank's state dict loads into a gathered sharded bank; FSDP's own (sharded) entries pass."""
    from .bases import bytes_as, is_sharded

    for suffix, (shape, dtype) in bank.layout.items():
        t = state_dict.get(key + suffix)
        if t is not None and not is_sharded(t) and t.dtype == dtype and tuple(t.shape) == shape:
            state_dict[key + suffix] = bytes_as(t, bank.storage_dtype)


def check_supported(experts: nn.Module) -> None:
    """ValueError unless `experts` is a fused-experts layout AdaptedExperts computes: gate and up
    concatenated in gate_up_proj [E, 2I, H], down_proj [E, H, I], no bias, not transposed."""
    kind = type(experts).__name__
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3):
        raise ValueError(f"{kind}: not a fused-experts module (3-D gate_up_proj and down_proj)")
    for flag, fine in (("has_bias", False), ("is_transposed", False), ("is_concatenated", True),
                       ("has_gate", True), ("has_post_expert_norm", False)):
        if getattr(experts, flag, fine) != fine:
            raise ValueError(f"{kind}: {flag}={getattr(experts, flag)} is not supported by qforge's 4-bit experts")
    if not hasattr(experts, "act_fn"):
        raise ValueError(f"{kind}: experts without an act_fn (their own gating) are not supported by qforge's "
                         "4-bit experts")
    E, two_i, H = gate_up.shape
    if tuple(down.shape) != (E, H, two_i // 2) or two_i % 2:
        raise ValueError(f"{kind}: gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} "
                         "are not [E, 2I, H] and [E, H, I]")
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        raise ValueError(f"{kind}: a custom gating function is not supported by qforge's 4-bit experts")


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers module holding fused 3-D expert parameters (not yet quantised)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (not isinstance(module, AdaptedExperts) and isinstance(gate_up, nn.Parameter)
            and isinstance(down, nn.Parameter) and gate_up.dim() == 3 and down.dim() == 3)


__all__ = ["FrozenBank", "ExpertBank", "DenseExpertBank", "ExpertLora", "AdaptedExperts", "EXPERT_PARAMETERS",
           "check_supported", "is_fused_experts"]
