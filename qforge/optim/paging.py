"""Where optimiser state lives, and moving it to the parameter's device for one update.

A paged optimiser keeps the state of GPU parameters on the GPU while there is room (DevicePager
below); when free GPU memory falls under what a step needs, the state moves to pinned host memory
and each parameter's state is copied to the device for its update and back (page_in / page_out),
so the GPU holds the state of one parameter at a time; when there is room again it moves back.
bitsandbytes pages with CUDA unified memory instead; explicit copies are simpler, can be tested on
any device and cost the same bytes. When state and parameter share a device (every CPU run, and a
GPU run without memory pressure) page_in and page_out return the very same tensors: no copies.
"""
from __future__ import annotations

import torch


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


# ---- paging on a GPU: state on the device, spilled to pinned host memory under pressure ---------------
def cuda_free_memory(device: torch.device) -> int:
    """Free bytes on CUDA `device` now (torch.cuda.mem_get_info; memory torch's caching allocator
    holds but has not handed out counts as used: a spill must not rely on the cache being emptied)."""
    return int(torch.cuda.mem_get_info(device)[0])


def step_bytes(params) -> int:
    """Working memory one 8-bit AdamW update needs on the device beyond the state: the update of the
    largest parameter (adamw8bit.adamw_step) holds five float32 tensors of its size (the gradient
    in float32, the two dequantised moments, the denominator, the float32 parameter) and the
    requantised codes and absmax (~1 byte per element per moment)."""
    return max((p.numel() * (5 * 4 + 2) for p in params), default=0)


def tensor_bytes(states) -> int:
    return sum(v.numel() * v.element_size() for s in states for v in s.values() if torch.is_tensor(v))


class DevicePager:
    """Where the paged optimiser state of accelerator parameters lives, decided before every step.

    The state lives on the parameter's device. When free device memory (`free_memory(device)`,
    torch.cuda.mem_get_info unless injected) falls under what a step needs, every state tensor is
    moved to pinned host memory (spill), and each parameter's state is copied to the device for its
    own update and back (page_in / page_out above). When there is room again for the state and a
    step, it is moved back (restore). Moves copy bytes; they never change a value, so a step's
    result is the same wherever the state was.

    `free_memory` injected (tests, a planner's forecast) applies the policy to parameters on any
    device, the CPU included, with "host" copies made in ordinary memory.
    """

    def __init__(self, free_memory=None, log=None):
        self.injected = free_memory is not None
        self.free_memory = free_memory or cuda_free_memory
        self.log = log
        self.on_host = False
        self.spills = self.restores = 0
        self.bytes_out = self.bytes_in = 0  # bytes moved to the host / back to the device, over the run

    def applies(self, p: torch.Tensor) -> bool:
        return self.injected or p.device.type == "cuda"

    def home(self, p: torch.Tensor) -> torch.device:
        """Where the state of `p` is kept now."""
        return torch.device("cpu") if self.on_host and self.applies(p) else p.device

    def before_step(self, states: dict) -> None:
        """Spill or restore the state of `states` ({param: state dict}) by the free memory now."""
        params = [p for p in states if self.applies(p)]
        if not params:
            return
        device = params[0].device
        need = step_bytes(params)
        held = tensor_bytes(states[p] for p in params)
        free = self.free_memory(device)
        if not self.on_host and free < need:
            self._move(states, params, to_host=True)
            self.spills += 1
            self.bytes_out += held
            self._say(f"optimizer state paged out to host memory: {held / 2**20:,.1f} MiB "
                      f"(free device memory {free / 2**20:,.0f} MiB < {need / 2**20:,.0f} MiB a step needs)")
        elif self.on_host and free >= need + held:
            self._move(states, params, to_host=False)
            self.restores += 1
            self.bytes_in += held
            self._say(f"optimizer state paged back to the device: {held / 2**20:,.1f} MiB "
                      f"(free device memory {free / 2**20:,.0f} MiB)")

    def _move(self, states: dict, params, to_host: bool) -> None:
        self.on_host = to_host
        for p in params:
            for k, v in states[p].items():
                if torch.is_tensor(v):
                    states[p][k] = _copy_to(v, torch.device("cpu") if to_host else p.device,
                                            pin=to_host and p.device.type == "cuda")

    def report(self) -> str | None:
        """One line on what was paged over the run, or None when nothing was."""
        if not self.spills:
            return None
        return (f"optimizer paging: {self.spills} spill(s) to host memory ({self.bytes_out / 2**20:,.1f} MiB), "
                f"{self.restores} return(s) to the device ({self.bytes_in / 2**20:,.1f} MiB)")

    def _say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)


def _copy_to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
    return out.copy_(t)
