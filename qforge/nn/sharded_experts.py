"""4-bit expert banks in a storage FSDP2 can shard, so that no rank holds every expert.

An ExpertBank keeps its stacked tensors (packed codes [E, P] uint8, absmax [E, A] float32, and with
double quantisation nested absmax [E, N] and offsets [E]) as buffers of its AdaptedExperts, and
FSDP never shards buffers: under `fully_shard` every rank held all the experts. `shard_banks`
turns each of those tensors into a frozen 1-D Parameter of a float dtype whose bytes are the
tensor's own (zero-padded to a whole element, `bytes_as`), registered under the buffer's name;
FSDP2 then chunks dim 0 of each over the ranks, as it does the linear layers' storage
(qforge.nn.bases.ShardedQuant4bitBase, bitsandbytes' `bnb_4bit_quant_storage`).

    gate_up_proj            uint8 [E, P]   -> Parameter storage_dtype [ceil(E*P / size)]
    gate_up_proj_absmax     f32   [E, A]   -> Parameter storage_dtype [E*A*4 / size]
    gate_up_proj_nested_absmax, gate_up_proj_offset  likewise

FSDP all-gathers a block's Parameters before its forward and again before its backward and
registers the whole tensors on the module meanwhile; a ShardedExpertBank reads them from its host
at each use and views them back as the original tensors (`gathered()`): the same bytes, never
converted or rounded, nothing copied. While only this rank's shard is registered (outside forward
and backward) the bank cannot compute and says so.

The experts' LoRA factors (ExpertLora: A [E, r, in], B [E, out, r]) are ordinary Parameters of the
block; they are sharded, or kept whole, by whatever qforge.dist.shard decides for adapters.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import QuantState
from .bases import bytes_as, is_sharded
from .experts import AdaptedExperts, ExpertBank, FrozenBank


class ShardedExpertBank(FrozenBank):
    """A 4-bit ExpertBank whose tensors are float-storage Parameters of `host` (names: the expert
    parameter's name plus ExpertBank.tensors()' suffixes), sharded or whole as FSDP leaves them."""

    sharded = True

    def __init__(self, bank: ExpertBank, host: nn.Module, name: str, dtype: torch.dtype):
        self.host, self.name, self.storage_dtype = host, name, dtype
        self.template: QuantState = bank.template
        self.num_experts, self.keys = bank.num_experts, bank.keys
        # suffix -> (shape, dtype) of the tensor the storage holds the bytes of
        self.layout = {suffix: (tuple(t.shape), t.dtype) for suffix, t in bank.tensors().items()}
        self._view: tuple | None = None  # (identity of the registered storage, the ExpertBank of its views)
        # the offsets as floats, read once: FSDP may gather into new memory each time, and reading
        # them from every gathered copy would sync the device once per bank and pass
        self._offsets: list | None = bank.offset_values()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_experts, *self.template.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Suffix -> the registered storage Parameter (this rank's shard, or the gathered whole)."""
        return {suffix: self.host._parameters[self.name + suffix] for suffix in self.layout}

    def gathered(self) -> ExpertBank:
        """The bank as views of the gathered storage (same bytes as before sharding). RuntimeError
        while FSDP has only this rank's shard registered."""
        storage = self.tensors()
        if any(is_sharded(p) for p in storage.values()):
            raise RuntimeError(f"expert parameter '{self.name}' is sharded: its experts exist only while FSDP "
                               "has gathered the block (inside its forward and backward)")
        key = tuple((id(p), p.data_ptr()) for p in storage.values())
        if self._view is None or self._view[0] != key:
            views = {suffix: unpack(storage[suffix], *self.layout[suffix]) for suffix in self.layout}
            bank = ExpertBank(views[""], views["_absmax"], views.get("_nested_absmax"), views.get("_offset"),
                              self.template)
            bank.keys = self.keys  # the recompute tape's identity per expert stays the bank's
            bank.replace_tensors(views)  # the codebooks follow the storage's device
            if self._offsets is None:
                self._offsets = bank.offset_values()
            bank._offset_values = self._offsets
            self.template = bank.template
            self._view = (key, bank)
        return self._view[1]

    # ---- the bank's questions, answered by the gathered bank ----------------------------------
    def expert(self, e: int) -> QuantState:
        return self.gathered().expert(e)

    def dequantize_expert(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        return self.gathered().dequantize_expert(e, dtype)

    def matmul(self, e: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        return self.gathered().matmul(e, x, transposed)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.gathered().dequantized(dtype)

    def expert_state_dicts(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.gathered().expert_state_dicts(prefix)

    def original_tensors(self) -> dict[str, torch.Tensor] | None:
        """Suffix -> the tensor as the unsharded bank registers it (a view), None while sharded."""
        storage = self.tensors()
        if any(is_sharded(p) for p in storage.values()):
            return None
        return {suffix: unpack(storage[suffix], *self.layout[suffix]) for suffix in self.layout}

    def nbytes(self) -> int:
        """Bytes of the whole bank (the unsharded tensors, without the storage's padding)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.layout.values())

    def held_bytes(self) -> tuple[int, int]:
        """(bytes of storage this rank holds, bytes of the whole storage)."""
        held = whole = 0
        for p in self.tensors().values():
            local = p.to_local() if is_sharded(p) else p
            held += local.numel() * local.element_size()
            whole += p.numel() * p.element_size()
        return held, whole

    def keeps_dtype(self) -> bool:
        return True

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing to take: the storage is read from the host at each use (and may have been loaded)."""
        self._view = self._offsets = None


def unpack(storage: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `shape` and `dtype` whose bytes lead the 1-D `storage` (a view, no copy)."""
    n = math.prod(shape) * dtype.itemsize
    return storage.detach().view(torch.uint8)[:n].view(dtype).view(shape)


def shard_bank(experts: AdaptedExperts, name: str, dtype: torch.dtype) -> list[nn.Parameter]:
    """Move 4-bit bank `name` of `experts` into float storage of `dtype` (see the module's
    docstring); returns the new Parameters. ValueError for a bank that is not 4-bit or is
    sharded already."""
    bank = experts.bank(name)
    if getattr(bank, "sharded", False):
        raise ValueError(f"expert parameter '{name}' is in its sharded storage already")
    if not isinstance(bank, ExpertBank):
        raise ValueError(f"expert parameter '{name}' is {type(bank).__name__}, not 4-bit: only 4-bit banks shard")
    params = []
    for suffix, t in bank.tensors().items():
        del experts._buffers[name + suffix]
        p = nn.Parameter(bytes_as(t, dtype), requires_grad=False)
        experts.register_parameter(name + suffix, p)
        params.append(p)
    experts.banks[name] = ShardedExpertBank(bank, experts, name, dtype)
    return params


def shard_banks(module: nn.Module, dtype: torch.dtype) -> list[nn.Parameter]:
    """Every 4-bit expert bank under `module` (each AdaptedExperts' ExpertBanks) into float storage
    of `dtype` that FSDP2 shards; returns the new storage Parameters, for the caller's FSDP group.
    Banks sharded already and dense banks (BF16 LoRA) are left as they are."""
    params = []
    for experts in module.modules():
        if isinstance(experts, AdaptedExperts):
            for name in list(experts.banks):
                if isinstance(experts.banks[name], ExpertBank):
                    params += shard_bank(experts, name, dtype)
    return params


def expert_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit expert banks this rank holds, bytes of the whole banks) under `module`: the
    local shards of sharded banks, and every byte of a bank not (yet) sharded."""
    held = whole = 0
    for experts in module.modules():
        if isinstance(experts, AdaptedExperts):
            for bank in experts.banks.values():
                if getattr(bank, "sharded", False):
                    h, w = bank.held_bytes()
                elif isinstance(bank, ExpertBank):
                    h = w = bank.nbytes()
                else:
                    continue
                held, whole = held + h, whole + w
    return held, whole


__all__ = ["ShardedExpertBank", "shard_bank", "shard_banks", "expert_bytes", "unpack"]
