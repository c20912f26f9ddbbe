"""Base offload (--offload-base): the 4-bit base waits in host memory; each transformer block's codes
come to the device just before the block computes and leave after.

    forward, block i:   pre-hook   bring i (wait for its prefetch), start bringing i+1
                        post-hook  release i; hook the grad of i's output
    backward, block i:  grad of i's output ready (block i+1's backward is done, block i's about to
                        start, before gradient checkpointing recomputes it): release all but i and
                        i-1, bring i, start bringing i-1
    end of backward:    release everything (a callback queued on autograd's engine)

So at most two blocks' codes are on the device at once, forward and backward, with or without
gradient checkpointing (the recomputation runs inside the block's backward, where it is resident;
transformers checkpoints a layer's forward, not its hooks, and with older versions the hooks see the
backward phase and leave residency alone). The window is kept by releasing everything outside it,
so two graphs' backwards interleaving (two forwards before one backward) cannot pile up blocks.

The blocks are qforge.dist.shard.blocks(model): items of a ModuleList holding 4-bit layers; each
4-bit layer in them gets an OffloadedQuant4bitBase (qforge.nn.offloaded_base) and each 4-bit MoE
expert bank an OffloadedExpertBank (qforge.nn.offloaded_experts), whose products resolve the
resident copy when they run, so no device copy is held by autograd between forward and backward.
A block's banks come and go with its linear bases (one schedule, the same counters). 4-bit layers
outside the blocks (none in the usual models: lm_head stays dense) keep their codes on the device.

On CUDA the host copies are pinned and the next block's copy runs on a side stream, overlapping the
current block's compute; the compute stream waits on the copy's event before using it, and each
copied tensor is marked as used on the compute stream (record_stream) so that releasing it never
lets the allocator hand its memory out while queued kernels still read it. On the CPU the device is
the host itself: copies go into fresh host tensors, synchronously, and are dropped after use, so the
tests check the schedule (`max_resident`, `misses`) and the losses against a run without it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.surgery import quantized_layers
from ..nn.offloaded_base import OffloadedQuant4bitBase, offload_layer
from ..nn.offloaded_experts import OffloadedExpertBank, offload_banks


def check_offload(cfg, world: int = 1) -> None:
    """The one-line refusals the config cannot see: several processes (the base is sharded then)."""
    if getattr(cfg, "offload_base", False) and world > 1:
        raise ValueError(f"offload_base: --offload-base trains in one process; with {world} processes the 4-bit "
                         "base is sharded across them instead (drop --offload-base or use --nproc 1)")


def _check(block: nn.Module) -> None:
    """ValueError when a 4-bit layer or expert bank of `block` cannot be offloaded (sharded,
    offloaded already)."""
    from ..model.surgery import expert_layers
    from ..nn import ShardedQuant4bitBase
    for _, experts in expert_layers(block):
        for bank in experts.banks.values():
            if bank.sharded:
                raise ValueError("offload_base: the 4-bit expert banks are sharded across processes; offloading "
                                 "and sharding do not combine (use one process)")
            if isinstance(bank, OffloadedExpertBank):
                raise ValueError("offload_base: the 4-bit expert banks are offloaded already")
    for _, layer in quantized_layers(block):
        if isinstance(layer.base, ShardedQuant4bitBase):
            raise ValueError("offload_base: the 4-bit base is sharded across processes; offloading and "
                             "sharding do not combine (use one process)")
        if isinstance(layer.base, OffloadedQuant4bitBase):
            raise ValueError("offload_base: the 4-bit base is offloaded already")


def _in_backward() -> bool:
    """True while autograd's engine runs a backward (in this thread): a recomputation, not a forward."""
    return torch._C._current_graph_task_id() != -1


class BaseOffload:
    """Hooks on every block of `model` that keep its 4-bit base off `device` except while it computes.

    `max_resident`: the most blocks whose device copy existed at once since construction;
    `peak_bytes`: their bytes at that moment; `misses`: products that found no resident copy."""

    def __init__(self, model: nn.Module, device: torch.device):
        from ..dist.shard import blocks
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks = blocks(model)
        for block in self.blocks:  # every refusal before any layer changes
            _check(block)
        # per block: its linear bases, then its expert banks (both answer bring/release/nbytes/misses)
        self.bases: list[list[OffloadedQuant4bitBase | OffloadedExpertBank]] = [
            [offload_layer(layer, self.device, pin=self.cuda) for _, layer in quantized_layers(block)]
            + offload_banks(block, self.device, pin=self.cuda) for block in self.blocks]
        self.block_bytes = [sum(b.nbytes() for b in bases) for bases in self.bases]
        self.resident: dict[int, torch.cuda.Event | None] = {}  # block -> its copy's event (CUDA, until used)
        self.max_resident = self.peak_bytes = self.brought = 0
        self.callback_task = None  # the backward whose end releases everything (its graph task id)
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before_forward(i)))
            self.handles.append(block.register_forward_hook(lambda m, a, out, i=i: self._after_forward(i, out)))

    # ---- totals ----------------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        """Bytes of the offloaded 4-bit base (what host memory holds for it)."""
        return sum(self.block_bytes)

    @property
    def misses(self) -> int:
        return sum(b.misses for bases in self.bases for b in bases)

    def describe(self) -> str:
        two = sorted(self.block_bytes)[-2:]
        banks = sum(isinstance(b, OffloadedExpertBank) for bases in self.bases for b in bases)
        experts = f" ({banks} MoE expert banks included)" if banks else ""
        return (f"--offload-base: 4-bit base of {self.host_bytes / 2**20:.1f} MiB{experts} in {len(self.blocks)} "
                f"blocks waits "
                f"in {'pinned ' if self.cuda else ''}host memory; at most 2 blocks ({sum(two) / 2**20:.1f} MiB) on "
                f"{self.device} at once" + ("" if self.cuda else " (on the CPU: copies into fresh host tensors, "
                                              "the mechanism without a saving)"))

    # ---- the schedule ----------------------------------------------------------------------------
    def _before_forward(self, i: int) -> None:
        if _in_backward():  # an older transformers' recomputation, inside block i's backward: resident already
            self._use(i)
            return
        self._window(i, i + 1)

    def _after_forward(self, i: int, output) -> None:
        if _in_backward():
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, i=i: self._before_backward(i))
        self._release(i)

    def _before_backward(self, i: int) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.callback_task:  # once per backward call
            self.callback_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        self._window(i, i - 1)

    def _after_backward(self) -> None:
        self.callback_task = None
        self.release_all()

    def _window(self, now: int, then: int) -> None:
        """Keep only blocks `now` (ready for use) and `then` (being brought, when it exists)."""
        for j in [j for j in self.resident if j not in (now, then)]:
            self._release(j)
        self._use(now)
        if 0 <= then < len(self.blocks):
            self._bring(then)

    def _bring(self, i: int) -> None:
        if i in self.resident:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after what the compute queued
            with torch.cuda.stream(self.stream):
                for base in self.bases[i]:
                    base.bring(non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.resident[i] = event
        else:
            for base in self.bases[i]:
                base.bring()
            self.resident[i] = None
        self.brought += 1
        if len(self.resident) >= self.max_resident:
            self.max_resident = len(self.resident)
            self.peak_bytes = max(self.peak_bytes, sum(self.block_bytes[j] for j in self.resident))

    def _use(self, i: int) -> None:
        """Block i's copy ready for the compute stream (brought now if it was not prefetched)."""
        self._bring(i)
        event = self.resident[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for base in self.bases[i]:
                for t in base.bring():  # resident already: its tensors
                    t.record_stream(compute)
            self.resident[i] = None

    def _release(self, i: int) -> None:
        if self.resident.pop(i, "absent") == "absent":
            return
        for base in self.bases[i]:
            base.release()

    def release_all(self) -> None:
        for i in list(self.resident):
            self._release(i)

    def remove(self) -> None:
        """Take the hooks off (the bases stay offloaded; products then bring temporary copies)."""
        for handle in self.handles:
            handle.remove()
        self.release_all()


def offload_base(model: nn.Module, device: torch.device, log=None) -> BaseOffload:
    """Install base offload on `model` (its 4-bit layers still on the host: load there first, then
    move the rest to `device`); kept as `model.base_offload`. ValueError when there is nothing to
    offload or the model's base cannot be (HQQ, sharded). 4-bit MoE expert banks are offloaded with
    their block."""
    from ..model.surgery import hqq_layers
    if any(True for _ in hqq_layers(model)):
        raise ValueError("offload_base: the HQQ base is not offloaded; use --quant-type nf4 or fp4")
    offload = BaseOffload(model, device)
    if not any(offload.bases):
        raise ValueError("offload_base: the model has no 4-bit layers in its blocks to offload (method qlora is needed)")
    model.base_offload = offload
    if log is not None:
        log(offload.describe())
    return offload
