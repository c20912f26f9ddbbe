"""8-bit AdamW (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"): a pure
per-parameter step and a thin torch.optim.Optimizer around it.

State of a parameter with n elements (`step` is a Python int, the number of updates done):
  n >= min_8bit_size: exp_avg_codes uint8[n], exp_avg_absmax float32[ceil(n/block_size)] (signed
                      dynamic map), exp_avg_sq_codes uint8[n], exp_avg_sq_absmax float32[...]
                      (unsigned map): about 2 bytes per parameter plus 8/block_size.
  n <  min_8bit_size: exp_avg, exp_avg_sq float32, shaped like the parameter (8 bytes per parameter;
                      small tensors such as biases and norms are too few to matter and too
                      sensitive to quantise).
A parameter sharded across processes (a DTensor, FSDP2's dim-0 shard) is updated on this rank's
local shard, with state for that shard only; whether the state is 8-bit follows the WHOLE tensor's
numel, so every rank decides as one process does. Given shards that start on a block_size boundary
of the flattened whole tensor (qforge.dist.shard keeps any other parameter whole), the blocks, their
absmax and hence every code are the ones a single process computes on the whole tensor.

The update is the one of torch.optim.AdamW (decoupled weight decay, bias correction) in float32,
with the operations in bitsandbytes' order, so with 8-bit state it is bit-identical to
bitsandbytes 0.50's AdamW8bit on CPU where torch's vectorised CPU kernels run (AVX2 or better):
they fuse `add_(alpha=)` and `addcmul_` into one rounding, as the native kernel does. Under
torch's scalar kernels (ATEN_CPU_CAPABILITY=default) those round twice, so the paths agree
within the update's rounding rather than bit for bit (tests/optim/test_adamw8bit.py).
"""
from __future__ import annotations

import math

import torch

from ..kernels import dispatch
from . import paging
from .qmap import dequantize_blockwise, dynamic_quant_map, num_blocks, quantize_blockwise

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed map?)
BLOCK_SIZE = 256       # values per absmax block of the 8-bit state
MIN_8BIT_SIZE = 4096   # smaller parameters keep 32-bit state


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t`: a DTensor's local shard (a view: writing it writes the
    parameter), any other tensor itself. torch's own class, so optim needs nothing from qforge.dist."""
    return t.to_local() if is_distributed(t) else t


def is_distributed(t) -> bool:
    """True for torch's DTensor (FSDP2's sharded parameters and their gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(t, DTensor)


def init_state(p: torch.Tensor, block_size: int, min_8bit_size: int) -> dict:
    """Zero state for parameter `p` (see the module docstring), on p's device: for a DTensor, the
    state of its local shard, 8-bit or not by the whole tensor's numel."""
    whole, p = p.numel(), local_part(p)
    n = p.numel()
    state: dict = {"step": 0}
    for name, _ in MOMENTS:
        if whole < min_8bit_size:
            state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            # Codes 0 with absmax 0 decode to 0.
            state[name + "_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
            state[name + "_absmax"] = torch.zeros(num_blocks(n, block_size), dtype=torch.float32, device=p.device)
    return state


def is_8bit(state: dict) -> bool:
    return "exp_avg_codes" in state


def read_moments(state: dict, shape: torch.Size, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) as float32 tensors of `shape`. For 32-bit state these are the state
    tensors themselves, so updating them in place updates the state."""
    if not is_8bit(state):
        return state["exp_avg"], state["exp_avg_sq"]
    return tuple(
        dequantize_blockwise(state[name + "_codes"], state[name + "_absmax"],
                             dynamic_quant_map(signed, state[name + "_codes"].device), block_size).view(shape)
        for name, signed in MOMENTS
    )


def write_moments(state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, block_size: int) -> None:
    """Store updated float32 moments into 8-bit state, in place (the state tensors keep their
    storage, so paged host buffers and state_dict references stay valid). No-op for 32-bit state."""
    if not is_8bit(state):
        return
    for (name, signed), value in zip(MOMENTS, (exp_avg, exp_avg_sq)):
        codes, absmax = quantize_blockwise(value, dynamic_quant_map(signed, value.device), block_size)
        state[name + "_codes"].copy_(codes)
        state[name + "_absmax"].copy_(absmax)


@torch.no_grad()
def adamw_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, block_size: int = 256) -> None:
    """One AdamW update of parameter `p` (float32 or bfloat16, any shape) from `grad` (same shape),
    in place; `state` (see the module docstring, on p's device) is updated in place. `step` is the
    1-based number of this update, for bias correction. All arithmetic is float32.
    On the CPU with 8-bit state the native kernel does it (dispatch.adamw_8bit: two passes
    around torch's sqrt), with the same roundings as the torch path below on vectorised CPU
    kernels (fused multiply-adds): the same bits there."""
    if _native_step(p, grad, state, lr, beta1, beta2, eps, weight_decay, step, block_size):
        return
    g = grad.float()
    exp_avg, exp_avg_sq = read_moments(state, p.shape, block_size)
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)

    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)

    # For a float32 parameter p32 is p itself; a bfloat16 one is updated in float32 and rounded once.
    p32 = p.float()
    p32.mul_(1.0 - lr * weight_decay)  # decoupled weight decay, before the Adam step as in torch
    p32.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if p32 is not p:
        p.copy_(p32)
    # The update used the float32 moments; only what is kept for the next step is quantised.
    write_moments(state, exp_avg, exp_avg_sq, block_size)


def _native_step(p, grad, state, lr, beta1, beta2, eps, weight_decay, step, block_size) -> bool:
    """adamw_step through a native kernel (qforge.kernels.dispatch); False (nothing done) where none applies."""
    if not is_8bit(state):
        return False
    moments = tuple(state[n + s] for n, _ in MOMENTS for s in ("_codes", "_absmax"))
    done = dispatch.adamw_8bit(p, grad, moments, dynamic_quant_map(True, p.device), dynamic_quant_map(False, p.device),
                               block_size, lr, beta1, beta2, eps, weight_decay, step)
    if done:
        torch.autograd.graph.increment_version(p)  # written in place behind torch's back, as copy_ would mark it
    return done




def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                          block_size: int, min_8bit_size: int) -> None:
    """Raise ValueError naming the first bad hyperparameter."""
    if not (isinstance(lr, (int, float)) and lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"AdamW8bit: lr must be a finite number >= 0, got {lr!r}")
    if len(betas) != 2:
        raise ValueError(f"AdamW8bit: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdamW8bit: betas[{i}] must be in [0, 1), got {beta!r}")
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"AdamW8bit: eps must be a finite number > 0, got {eps!r}")
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"AdamW8bit: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"AdamW8bit: block_size must be a positive int, got {block_size!r}")
    if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
        raise ValueError(f"AdamW8bit: min_8bit_size must be an int >= 0, got {min_8bit_size!r}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments for tensors of at least `min_8bit_size` elements.

    paged=True (qforge.optim.paging.DevicePager): the state of GPU parameters lives on the GPU and
    is spilled to pinned host memory when free GPU memory falls under what a step needs, then
    copied to the GPU per update, and brought back when there is room; `free_memory(device)`
    replaces torch.cuda.mem_get_info (tests force the decision with it, on CPU tensors too);
    `log` receives a line at each spill and return. CPU parameters keep their state in place."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, paged: bool = False, block_size: int = BLOCK_SIZE,
                 min_8bit_size: int = MIN_8BIT_SIZE,
                 free_memory=None, log=None):
        self.paged = paged
        self.pager = paging.DevicePager(free_memory, log) if paged else None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        check_hyperparameters(**defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        check_hyperparameters(**{k: param_group.get(k, v) for k, v in self.defaults.items()})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
        if self.pager is not None:  # spill or restore before the first update touches device memory
            self.pager.before_step({p: self.state[p] for g in self.param_groups for p in g["params"]
                                    if p.grad is not None and self.state[p]})
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._placed(p, init_state(p, group["block_size"], group["min_8bit_size"])))
                state["step"] += 1
                shard = local_part(p)
                if shard.numel() == 0:  # a rank past the end of a short parameter: nothing of it here
                    continue
                on_device = paging.page_in(state, shard.device)
                adamw_step(shard, local_part(p.grad), on_device, group["lr"], *group["betas"], group["eps"],
                           group["weight_decay"], state["step"], group["block_size"])
                paging.page_out(state, on_device)
        return loss

    def state_bytes(self) -> int:
        """Bytes held by all state tensors (codes, absmax and 32-bit moments; the step counts are
        Python ints and not counted)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values() if torch.is_tensor(v))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that state keeps its dtypes (torch would cast uint8 codes and float32
        moments to the parameter's dtype) and goes to this optimizer's state device, copied."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in state_dict["state"]:
                self.state[p] = self._placed(p, state_dict["state"][i])

    def _placed(self, p: torch.Tensor, state: dict) -> dict:
        """Copies of the tensors of `state` where p's state is kept now (the pager's choice)."""
        p = local_part(p)
        home = self.pager.home(p) if self.pager is not None else p.device
        pin = home.type == "cpu" and p.device.type == "cuda"
        return {k: paging._copy_to(v, home, pin) if torch.is_tensor(v) else v for k, v in state.items()}

    def paging_report(self) -> str | None:
        """What was paged over the run (one line), or None."""
        return self.pager.report() if self.pager is not None else None
