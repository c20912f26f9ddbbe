"""Where optimiser state lives, and moving it to the parameter's device for one update.

Paged state lives in host (CPU) memory, pinned when the parameter is on a CUDA device so the
copies can use DMA; each parameter's state is copied to the device for its update and back, so
the accelerator holds the state of one parameter at a time. bitsandbytes pages with CUDA unified
memory instead; explicit copies are simpler, work on any device and cost the same bytes per step.
When state and parameter share a device (every CPU run, and unpaged runs anywhere) both moves
return the very same tensors: no copies.
"""
from __future__ import annotations

import torch


def state_device(param: torch.Tensor, paged: bool) -> torch.device:
    """The device a parameter's state is stored on: the host when paged, else the parameter's."""
    return torch.device("cpu") if paged else param.device


def place(t: torch.Tensor, param: torch.Tensor, paged: bool) -> torch.Tensor:
    """A copy of `t` (any dtype and shape kept) on the state device of `param`; never aliases `t`."""
    device = state_device(param, paged)
    pin = device.type == "cpu" and param.device.type == "cuda"
    out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
    return out.copy_(t)


def page_in(state: dict, device: torch.device) -> dict:
    """The tensors of `state` on `device`; non-tensors (the step count) pass through.
    A tensor already on `device` is returned as is (the same object: no copy)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in state.items()}


def page_out(host_state: dict, device_state: dict) -> None:
    """Write the updated tensors of `device_state` back into `host_state` in place.
    Tensors that are the same objects (no paging happened) are skipped. The copy is synchronous:
    the host state must be valid when read by state_dict() or a checkpoint writer."""
    for k, v in device_state.items():
        if torch.is_tensor(v) and v is not host_state[k]:
            host_state[k].copy_(v)
