"""Activation offload (--offload-activations): what forward saves for backward waits in host memory.

torch's saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) see every tensor an operation
saves for its backward. ActivationOffload's pack hook copies each saved activation of at least
MIN_BYTES from the GPU into pinned host memory (an asynchronous copy) and its unpack hook brings it
back when backward needs it, so the GPU holds one layer's activations at a time instead of every
layer's. Unlike torch.autograd.graph.save_on_cpu it leaves the model's own tensors where they are
(weights, the 4-bit codes and their constants, buffers are saved by reference by the layers that
use them, and copying them would move the model to the host and back every step). With gradient
checkpointing, what is saved outside the checkpointed layers (each layer's input, the final norm
and the loss' inputs) is offloaded; the recomputed layer's own tensors live only during its backward.

On the CPU there is nothing to offload to: activations already live in host memory, so the option
changes nothing there, and the trainer says so once (`describe`). `ActivationOffload(...,
on_cpu=True)` copies them anyway (to fresh host tensors): the tests use it to check that a run with
the hooks gives the same result as without.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

MIN_BYTES = 1 << 16  # smaller saved tensors stay put: copying them costs more than it saves


def _model_storages(model: nn.Module) -> set[int]:
    """Data pointers of every tensor the model holds: parameters, buffers and the tensors of
    state objects its modules keep as attributes (the 4-bit layers' QuantState, nested once)."""
    ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for module in model.modules():
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                for inner in vars(value).values():
                    inner = vars(inner).values() if dataclasses.is_dataclass(inner) else [inner]
                    ptrs.update(t.untyped_storage().data_ptr() for t in inner if isinstance(t, torch.Tensor))
    ptrs.discard(0)
    return ptrs


class ActivationOffload:
    """A context manager for the forward pass: saved activations move to host memory, and back for
    backward. `offloaded_bytes` counts what was moved since construction."""

    def __init__(self, model: nn.Module, device: torch.device, on_cpu: bool = False, min_bytes: int = MIN_BYTES):
        self.device, self.min_bytes = torch.device(device), min_bytes
        self.active = self.device.type != "cpu" or on_cpu
        self.model_storages = _model_storages(model) if self.active else set()
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.offloaded_bytes = 0

    def describe(self) -> str:
        if self.device.type == "cpu" and not self.active:
            return ("--offload-activations: training on the CPU, whose activations already live in host memory; "
                    "nothing to offload, the option changes nothing here (gradient checkpointing is what holds "
                    "fewer activations on a CPU)")
        return f"--offload-activations: saved activations of {self.min_bytes} bytes or more wait in host memory"

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if (nbytes < self.min_bytes or tensor.device != self.device or tensor.layout != torch.strided
                or tensor.untyped_storage().data_ptr() in self.model_storages):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=self.pin)
        host.copy_(tensor, non_blocking=self.pin)
        self.offloaded_bytes += nbytes
        return (tensor.device, host, tensor.requires_grad)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, _ = packed
        return host.to(device, non_blocking=self.pin) if device.type != "cpu" else host

    def __enter__(self):
        self._hooks = (torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
                       if self.active else contextlib.nullcontext())
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
