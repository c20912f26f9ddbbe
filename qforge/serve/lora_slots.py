"""Adapter slots: the serving side of multi-LoRA, several adapters in one batch over one shared base.

As in vLLM's LoRA layers, every adapted layer of the served model is replaced by its serving form
(SlotLinear: the same base, bias, adapters and module path) and the adapters the server holds live
in preallocated stacked tensors per layer, one slot per adapter:
    A      [S, r_max, in]    lora_A, ranks zero-padded to the largest loaded rank
    B      [S, out, r_max]   lora_B
    s      [S]               the adapter's scaling for this layer
    factor [S, out]          DoRA's m / ||W + s B A|| (ones for plain LoRA), only once a DoRA adapter is loaded
A batch names one slot per row (or none); the layer computes the shared base product once and adds
each row's low-rank delta from its slot: one batched product through qforge.kernels.dispatch
(the Triton `gathered_lora` kernel on CUDA), or, when every row uses the same slot, the adapter
layer's own low-rank helper (qforge.nn.add_low_rank) on that slot's views. No per-request weight swaps, no per-forward concatenation.

MoE experts (qforge.nn.experts.AdaptedExperts, LoRA on the routed experts' fused parameters) are
served the same way (SlotExperts): per expert parameter, A [E, S, r_max, in] and B [E, S, out, r_max]
(expert-major, so that one expert's slots are a contiguous [S, r, in] for the kernels);
each token takes its row's slot, and the tokens routed to expert e get their low-rank terms in one
gathered product over that expert's slots. The router and any shared expert are plain layers.

Slots are allocated when the first adapter is loaded and grow (doubling, up to the capacity) as more
are; the registry decides which adapters occupy them (LRU) and holds its lock around every forward.
Outside a batch selection a SlotLinear is the layer it replaced (in-process adapters, active adapter).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..kernels import dispatch
from ..model.surgery import adapted_layers, expert_layers, set_module
from ..nn import AdaptedLinear, LoraAdapter, add_low_rank
from ..nn.experts import AdaptedExperts


BASE_ONLY = -1  # LoraSlots.single when no row of the batch uses an adapter


class SlotsFull(Exception):
    """Every slot holds an adapter: the registry must evict one first."""


class SlotLinear(AdaptedLinear):
    """One adapted layer as the server runs it: the layer it replaces (same base, bias, in-process
    adapters and module path, so names, adapter loading and state dicts see no difference) plus
    the slots. Outside a batch selection it is that layer (its active adapter)."""

    @classmethod
    def replacing(cls, layer: AdaptedLinear, bank: "LoraSlots") -> "SlotLinear":
        new = cls(layer.base, None, layer.compute_dtype)
        new.bias, new.adapters, new.active_adapter = layer.bias, layer.adapters, layer.active_adapter
        new.keep_input_dtype = layer.keep_input_dtype
        new.__dict__["bank"] = bank  # not a child module
        new.A = new.B = new.scalings = new.factor = None
        return new

    def unwrapped(self) -> AdaptedLinear:
        """A plain AdaptedLinear holding the same base, bias and in-process adapters."""
        layer = AdaptedLinear(self.base, None, self.compute_dtype)
        layer.bias, layer.adapters, layer.active_adapter = self.bias, self.adapters, self.active_adapter
        layer.keep_input_dtype = self.keep_input_dtype
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        if bank.rows is None:  # not serving a batch: the layer as it is
            return super().forward(x)
        x_c = x.to(self.compute_dtype)
        out = self.base.product(x_c)
        if bank.single != BASE_ONLY and self.A is not None:
            out = self.add_slots(out, x_c, bank.single, bank.rows)
        if self.bias is not None:  # after DoRA's factor, which scales W x + s B A x only
            out = out + self.bias
        return self.finish(out, x)

    def add_slots(self, out: torch.Tensor, x: torch.Tensor, k: int | None, rows: torch.Tensor) -> torch.Tensor:
        """out [..., out] plus each row's slot term, times DoRA's factor where a slot has one.
        k: the one slot of every row (its views, the layers' low-rank helper: no gather), else None
        and `rows` [B] names each row's slot (-1: none) for one batched product."""
        dtype = x.dtype
        if k is not None:
            out = add_low_rank(out, x, self.A[k].to(dtype), self.B[k].to(dtype), self.scalings[k].to(dtype))
            return out if self.factor is None else out * self.factor[k].to(out.dtype)
        out = out + dispatch.gathered_lora(x, self.A, self.B, rows, self.scalings)
        if self.factor is None:
            return out
        factor = torch.where((rows >= 0)[:, None], self.factor[rows.clamp(min=0)], 1.0).to(out.dtype)  # [B, out]
        return out * (factor[:, None, :] if out.dim() == 3 else factor)

    # ---- slot tensors -------------------------------------------------------------------------
    def _resize(self, slots: int, rank: int, device, dtype) -> None:
        def grown(old, shape, fill=0.0):
            new = torch.full(shape, fill, dtype=dtype if old is None else old.dtype, device=device)
            if old is not None:
                new[tuple(slice(0, n) for n in old.shape)] = old
            return new

        n_in, n_out = self.in_features, self.out_features
        self.A = grown(self.A, (slots, rank, n_in))
        self.B = grown(self.B, (slots, n_out, rank))
        self.scalings = grown(self.scalings, (slots,)).float()
        if self.factor is not None:
            self.factor = grown(self.factor, (slots, n_out), 1.0)

    @torch.no_grad()
    def write(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Put `adapter` (None: nothing, a zero delta) in `slot`."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.scalings[slot] = 0.0
        if self.factor is not None:
            self.factor[slot].fill_(1.0)
        if adapter is None:
            return
        r = adapter.r
        self.A[slot, :r].copy_(adapter.lora_A.weight)
        self.B[slot, :, :r].copy_(adapter.lora_B.weight)
        self.scalings[slot] = adapter.scaling
        factor = adapter.variant.serving_scale(self, adapter)
        if factor is not None:
            if self.factor is None:
                self.factor = torch.ones(self.A.shape[0], self.out_features, dtype=torch.float32, device=self.A.device)
            self.factor[slot].copy_(factor)


class SlotExperts(AdaptedExperts):
    """An experts module as the server runs it: the AdaptedExperts itself with its class swapped (its
    banks, buffers and in-process adapters untouched, so the state dict and module path are the same),
    plus per expert parameter the slots A [E, S, r, in], B [E, S, out, r] and scalings [S]. Outside a
    batch selection it is the module it was."""

    @classmethod
    def wrapping(cls, module: AdaptedExperts, bank: "LoraSlots") -> "SlotExperts":
        module.__class__ = cls  # in place: a copy would have to re-register every bank's buffers
        module.__dict__["slot_bank"] = bank  # not a child module (`bank` is the frozen banks' getter)
        module.slot_A, module.slot_B, module.slot_s = {}, {}, {}
        return module

    def unwrapped(self) -> AdaptedExperts:
        for attr in ("slot_bank", "slot_A", "slot_B", "slot_s"):
            self.__dict__.pop(attr, None)
        self.__class__ = AdaptedExperts
        return self

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        bank = self.slot_bank
        if bank.rows is None:  # not serving a batch: the module as it is
            return super().forward(hidden_states, top_k_index, top_k_weights)
        token_slots = None  # no row of the batch has an adapter
        if bank.single != BASE_ONLY and self.slot_A:
            # the sparse block flattened (B, L, H) to (B*L, H): token t belongs to row t // L
            token_slots = bank.rows.repeat_interleave(hidden_states.shape[0] // bank.rows.numel())  # (T,)
        return self._routed(hidden_states, top_k_index, top_k_weights, token_slots)

    def _routed(self, hidden_states, top_k_index, top_k_weights, token_slots) -> torch.Tensor:
        """AdaptedExperts.forward with each token's low-rank terms from its slot (None: the base alone)."""
        x = hidden_states.to(self.compute_dtype)                                     # (T, H)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = torch.unique(top_k_index).tolist()
        for e in routed:
            if not 0 <= e < self.num_experts:
                continue
            token_idx, k_pos = torch.where(top_k_index == e)
            slots = None if token_slots is None else token_slots[token_idx]           # (n_e,)
            h = self._slot_project("gate_up_proj", e, x[token_idx], slots)          # (n_e, 2I)
            gate, up = h.chunk(2, dim=-1)
            y = self._slot_project("down_proj", e, self.act_fn(gate) * up, slots)   # (n_e, H)
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out

    def _slot_project(self, name: str, e: int, x: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        y = self.bank(name).product(x, e)                                            # (n, out)
        if slots is None or name not in self.slot_A:
            return y
        A, B = self.slot_A[name][e], self.slot_B[name][e]                            # [S, r, in], [S, out, r]
        return y + dispatch.gathered_lora(x, A, B, slots, self.slot_s[name]).to(y.dtype)

    # ---- slot tensors -------------------------------------------------------------------------
    def _resize(self, slots: int, rank: int, device, dtype) -> None:
        for name in self.banks:
            E, n_out, n_in = self.expected_shape(name)
            shapes = {"A": (E, slots, rank, n_in), "B": (E, slots, n_out, rank)}
            for key, store in (("A", self.slot_A), ("B", self.slot_B)):
                old, new = store.get(name), torch.zeros(shapes[key], dtype=dtype, device=device)
                if old is not None:
                    new[tuple(slice(0, n) for n in old.shape)] = old
                store[name] = new
            old_s, new_s = self.slot_s.get(name), torch.zeros(slots, dtype=torch.float32, device=device)
            if old_s is not None:
                new_s[:old_s.numel()] = old_s
            self.slot_s[name] = new_s

    @torch.no_grad()
    def write(self, slot: int, loras: dict | None) -> None:
        """Put an adapter's expert LoRAs (parameter name -> ExpertLora; None: nothing) in `slot`."""
        for name in self.slot_A:
            self.slot_A[name][:, slot].zero_()
            self.slot_B[name][:, slot].zero_()
            self.slot_s[name][slot] = 0.0
            lora = loras[name] if loras is not None and name in loras else None
            if lora is not None:
                self.slot_A[name][:, slot, :lora.r].copy_(lora.lora_A)
                self.slot_B[name][:, slot, :, :lora.r].copy_(lora.lora_B)
                self.slot_s[name][slot] = lora.scaling


def unwrap(model: nn.Module) -> nn.Module:
    """Put a plain AdaptedLinear (AdaptedExperts) back for every serving layer of `model` (the model as
    before serving)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SlotLinear):
            set_module(model, name, module.unwrapped())
        elif isinstance(module, SlotExperts):
            module.unwrapped()
    return model


class LoraSlots:
    """The slots of every adapted layer of `model` (wrapped in place), up to `capacity` adapters in
    `dtype`. `load` fills a free slot, `unload` frees one, `select` runs a batch with a slot per row."""

    def __init__(self, model: nn.Module, capacity: int, dtype: torch.dtype):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.dtype = capacity, dtype
        self.layers: dict[str, SlotLinear] = {}
        unwrap(model)  # slots of an earlier bank on this model: replaced by this one's
        for name, layer in list(adapted_layers(model)):
            serving = SlotLinear.replacing(layer, self)
            set_module(model, name, serving)
            self.layers[name] = serving
        self.experts: dict[str, SlotExperts] = {name: SlotExperts.wrapping(module, self)
                                                for name, module in list(expert_layers(model))}
        self.names: list[str | None] = []  # slot -> adapter name
        self.rank = 0
        self.rows: torch.Tensor | None = None
        self.single: int | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def loaded(self) -> list[str]:
        return [n for n in self.names if n is not None]

    def slot_of(self, name: str) -> int:
        return self.names.index(name)

    def in_process(self, name: str) -> dict:
        """Adapter `name` as attached to the model (layer path -> LoraAdapter, experts path -> its
        expert LoRAs), in the form `load` takes."""
        out = {path: layer.adapters[name] for path, layer in self.layers.items() if name in layer.adapters}
        out.update({path: m.adapters[name] for path, m in self.experts.items() if name in m.adapters})
        return out

    def _modules(self) -> list:
        return [*self.layers.values(), *self.experts.values()]

    def load(self, name: str, adapters: dict) -> int:
        """Put adapter `name` (layer path -> its LoraAdapter, experts module path -> {parameter name:
        ExpertLora}; layers not named get a zero delta) in a free slot; SlotsFull when none is free.
        Returns the slot."""
        if name in self.names:
            raise ValueError(f"adapter '{name}' is loaded already")
        unknown = sorted(set(adapters) - set(self.layers) - set(self.experts))
        if unknown:
            raise ValueError(f"adapter '{name}' names layers the served model does not adapt: {unknown[:5]}")
        slot = next((i for i, n in enumerate(self.names) if n is None), None)
        if slot is None:
            if len(self.names) >= self.capacity:
                raise SlotsFull(f"all {self.capacity} adapter slots are in use")
            slot = len(self.names)
        ranks = [a.r for path, a in adapters.items() if path in self.layers]
        ranks += [lora.r for path, loras in adapters.items() if path in self.experts for lora in loras.values()]
        rank = max(ranks + [self.rank, 1])
        if slot >= len(self.names) or rank > self.rank:
            size = len(self.names) if slot < len(self.names) else \
                max(slot + 1, min(self.capacity, max(2, 2 * len(self.names))))
            for layer in self.layers.values():
                layer._resize(size, rank, layer.weight.device, self.dtype)
            for module in self.experts.values():
                module._resize(size, rank, next(iter(module.buffers())).device, self.dtype)
            self.names += [None] * (size - len(self.names))
            self.rank = rank
        for path, module in [*self.layers.items(), *self.experts.items()]:
            module.write(slot, adapters.get(path))
        self.names[slot] = name
        return slot

    def unload(self, name: str) -> None:
        slot = self.slot_of(name)
        for module in self._modules():
            module.write(slot, None)
        self.names[slot] = None

    @contextlib.contextmanager
    def select(self, adapters: list[str | None], device: torch.device):
        """Within the block, row b of every forward uses adapter adapters[b] (None: the base alone)."""
        slots = [-1 if a is None else self.slot_of(a) for a in adapters]
        self.rows = torch.tensor(slots, dtype=torch.long, device=device)
        self.single = slots[0] if len(set(slots)) == 1 else None  # BASE_ONLY (-1) when no row has one
        try:
            yield
        finally:
            self.rows, self.single = None, None
