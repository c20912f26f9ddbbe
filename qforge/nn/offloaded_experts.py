"""OffloadedExpertBank: a 4-bit expert bank kept in host memory, on the device only while in use.

The MoE counterpart of qforge.nn.offloaded_base (--offload-base). The bank's stacked tensors
(packed codes [E, P] uint8, absmax [E, A] float32, nested absmax [E, N] and offsets [E] with double
quantisation) stay where they are, in host memory (pinned when the device is a GPU, so that the copy
can be asynchronous), registered on the AdaptedExperts as every bank's are: the state dict, merges
and saved folders read them there. Between `bring()` and `release()` (which qforge.train.offload_base
calls around the block's forward and backward, with the block's linear bases) a device copy exists,
`resident`: an ExpertBank of fresh device tensors sharing the host bank's recompute keys and offsets.

The products are the bank's own (FrozenBank.product: the autograd Function holds the bank and the
expert index, not tensors), so each product resolves whichever copy is resident when it runs,
forward or backward, and no device copy is held by autograd between them. A product that finds no
resident copy (a caller outside the hooks) copies its one expert's state to the device for itself
and counts it in `misses`: slower, never wrong.

On the CPU the "device" is the host: `bring()` copies into fresh host tensors and `release()` drops
them, so the tests run the same mechanism as a GPU run.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import dispatch
from ..quant import QuantState
from .bases import dequantize_cached
from .experts import AdaptedExperts, ExpertBank
from .offloaded_base import map_state


class OffloadedExpertBank(ExpertBank):
    """An ExpertBank whose tensors (the host copy) are in host memory, and whose products compute on
    `device` from `resident`, the copy brought there for the block's forward or backward.
    `host`/`name`: the AdaptedExperts registering the tensors and the expert parameter's name."""

    offloaded = True

    def __init__(self, bank: ExpertBank, host: nn.Module, name: str, device: torch.device, pin: bool = False):
        tensors = {suffix: t.detach().to("cpu") for suffix, t in bank.tensors().items()}
        if pin:
            tensors = {suffix: t.pin_memory() for suffix, t in tensors.items()}
        super().__init__(tensors[""], tensors["_absmax"], tensors.get("_nested_absmax"), tensors.get("_offset"),
                         bank.template)
        ExpertBank.replace_tensors(self, tensors)  # the codebooks on the host too
        self.keys = bank.keys  # the recompute tape's identity per expert stays the bank's
        self.host, self.name, self.pin = host, name, pin
        self.device = torch.device(device)
        self.device_template = self._template_on(self.device)
        self.resident: ExpertBank | None = None
        self.misses = 0  # products that found no resident copy and made a temporary one

    def _template_on(self, device: torch.device) -> QuantState:
        """The bank's template (one expert's shape, codebooks) with its codebooks on `device`."""
        return map_state(self.template, lambda t: t.to(device))

    # ---- the device copy ------------------------------------------------------------------------
    def bring(self, non_blocking: bool = False) -> list[torch.Tensor]:
        """Make the device copy (a no-op when it exists); its tensors, for the caller's stream
        bookkeeping. On the CPU: fresh host tensors (copy=True), as a GPU run's fresh device ones."""
        if self.resident is None:
            t = {suffix: x.to(self.device, non_blocking=non_blocking, copy=True)
                 for suffix, x in self.tensors().items()}
            copy = ExpertBank(t[""], t["_absmax"], t.get("_nested_absmax"), t.get("_offset"), self.device_template)
            copy.keys = self.keys
            copy._offset_values = self.offset_values()  # read from the host copy: no device sync
            self.resident = copy
        return list(self.resident.tensors().values())

    def release(self) -> None:
        """Drop the device copy (the caching allocator reuses its memory once the queued work is done)."""
        self.resident = None

    # ---- products: resolved when they run ------------------------------------------------------
    def matmul(self, e: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
        """x @ W[e]^T (transposed) or x @ W[e], from the resident copy, else expert e's state copied
        to the device for this product (counted in `misses`)."""
        if self.resident is not None:
            return self.resident.matmul(e, x, transposed)
        self.misses += 1
        state = map_state(self.expert(e), lambda t: t.to(self.device))
        return dispatch.matmul_4bit(x, state, lambda dtype: dequantize_cached(state, dtype), transposed)

    # ---- the host's hooks ------------------------------------------------------------------------
    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """After the host's buffers moved or were loaded. Loaded (in place) or moved within host
        memory: take them. Moved to a device (module.to(device)): the bank computes there from now
        on, and the host copy stays what the host registers (the moved tensors, a transient copy of
        the same bytes, are dropped)."""
        device = tensors[""].device
        if device.type == "cpu":
            if self.pin and not tensors[""].is_pinned():
                tensors = {suffix: t.pin_memory() for suffix, t in tensors.items()}
            ExpertBank.replace_tensors(self, tensors)
        else:
            self.device = device
            self.device_template = self._template_on(device)
        for suffix, t in self.tensors().items():
            self.host._buffers[self.name + suffix] = t
        self.resident = None

    def describe(self) -> str:
        return f"4-bit expert bank {list(self.shape)}, offloaded to host memory (computes on {self.device})"


def offload_banks(block: nn.Module, device: torch.device, pin: bool = False) -> list[OffloadedExpertBank]:
    """Give every 4-bit expert bank under `block` (AdaptedExperts' ExpertBanks, in module order) its
    offloaded form; returns them. Dense banks (BF16 LoRA) stay as they are."""
    banks = []
    for experts in block.modules():
        if isinstance(experts, AdaptedExperts):
            for name, bank in list(experts.banks.items()):
                if type(bank) is ExpertBank:
                    offloaded = OffloadedExpertBank(bank, experts, name, device, pin)
                    experts.set_bank(name, offloaded)
                    banks.append(offloaded)
    return banks


__all__ = ["OffloadedExpertBank", "offload_banks"]
