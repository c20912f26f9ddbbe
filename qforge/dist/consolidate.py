"""Whole tensors from sharded ones and back: what makes a checkpoint the same files whatever N.

A checkpoint holds the one-process form: every trainable parameter whole, and the optimiser's state
as one process keeps it (AdamW8bit: the 8-bit codes of the whole flattened parameter and one absmax
per 256-value block; 32-bit moments shaped like the parameter; torch's AdamW: its moments whole).
Saving gathers (collectives on every rank, in the same order: module order, parameter order);
restoring slices that whole state to this rank's dim-0 rows, so N=4 resumes at N=2 or N=1.
FSDP2 cuts dim 0 as torch.chunk does: ceil(rows / N) rows a rank, the last ranks shorter or empty;
a DTensor's local shard carries no padding, so the ranks' shards concatenate to the whole.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..nn.bases import is_sharded
from ..optim.adamw8bit import BLOCK_SIZE, local_part
from .group import Group


def row_range(p: torch.Tensor) -> tuple[int, int]:
    """(first row, number of rows) of dim 0 that this rank holds of `p` (a DTensor sharded on dim 0
    over a 1-D mesh; a plain tensor: all of it)."""
    if not is_sharded(p):
        return 0, (p.shape[0] if p.dim() else 1)
    from torch.distributed.tensor import Shard
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"expected a tensor sharded on dim 0 over one mesh dimension, got placements {p.placements}")
    mesh = p.device_mesh
    rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    held = min(rows, start + chunk) - start
    assert held == local_part(p).shape[0], (held, local_part(p).shape)  # torch.chunk's cut, as FSDP2's
    return start, held


@contextlib.contextmanager
def whole_trainable(model: nn.Module, group: Group):
    """Within the block, every sharded trainable parameter of `model` is whole on every rank (one
    all-gather each; every rank must enter): what a checkpoint and the PEFT adapter file read.
    Only the trainable ones: the adapters are small; the base and embeddings stay sharded."""
    swapped, whole = [], {}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.requires_grad or not is_sharded(p):
                    continue
                if id(p) not in whole:  # a tied parameter is gathered once
                    whole[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def load_whole_into(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's rows of `whole` (the parameter's full value) into `p` (sharded or not)."""
    if tuple(whole.shape) != tuple(p.shape):  # a sharded copy would take a slice of the wrong tensor silently
        raise ValueError(f"checkpoint tensor has shape {list(whole.shape)}, the model expects {list(p.shape)}")
    start, rows = row_range(p)
    with torch.no_grad():
        local_part(p).copy_(whole[start:start + rows] if is_sharded(p) else whole)


def whole_optimizer_state(optimizer, group: Group) -> dict | None:
    """The optimiser's state_dict in the one-process form on rank 0 (None elsewhere); every rank
    must call it. The state of each sharded parameter is gathered and concatenated in rank order."""
    sd = optimizer.state_dict()
    sd = {**sd, "state": {i: dict(s) for i, s in sd["state"].items()}}  # not the live state's dicts
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not group.distributed:
        return sd
    mine = {i: {k: local_part(v).detach().cpu() for k, v in s.items() if _per_row(v)}
            for i, s in sd["state"].items() if is_sharded(params[i])}
    gathered = group.gather(mine)
    if not group.is_main:
        return None
    for i, tensors in mine.items():
        for key in tensors:
            sd["state"][i][key] = torch.cat([rank[i][key] for rank in gathered])
    return sd  # what is not per-row (step counts) is a plain value, the same on every rank


def local_optimizer_state(sd: dict, optimizer) -> dict:
    """`sd` (the one-process form, whole_optimizer_state) cut to this rank's shards: what
    optimizer.load_state_dict takes. AdamW8bit keeps plain tensors of its local shard; torch's
    optimisers get DTensors shaped as their parameters."""
    params, blocks = [], []
    for g in optimizer.param_groups:
        params += g["params"]
        blocks += [g.get("block_size", BLOCK_SIZE)] * len(g["params"])
    out = {**sd, "state": dict(sd["state"])}
    for i, state in sd["state"].items():
        p = params[int(i)]
        if is_sharded(p):
            out["state"][i] = {k: _slice(v, k, p, blocks[int(i)], _keeps_plain(optimizer)) if _per_row(v) else v
                               for k, v in state.items()}
    return out


def _per_row(v) -> bool:
    return torch.is_tensor(v) and v.dim() > 0


def _keeps_plain(optimizer) -> bool:
    from ..optim import AdamW8bit
    return isinstance(optimizer, AdamW8bit)


def _slice(v: torch.Tensor, key: str, p: torch.Tensor, block_size: int, plain: bool) -> torch.Tensor:
    """This rank's part of one whole state tensor of parameter `p`."""
    start, rows = row_range(p)
    row_numel = math.prod(p.shape[1:])
    first, count = start * row_numel, rows * row_numel
    if key.endswith("_codes"):  # one code per value of the flattened parameter
        part = v[first:first + count]
    elif key.endswith("_absmax"):  # one per block; a shard starts on a block boundary (keeps_blocks)
        part = v[first // block_size:first // block_size + -(-count // block_size)]
    else:  # shaped like the parameter
        part = v[start:start + rows]
    part = part.clone()
    if plain:
        return part
    from torch.distributed.tensor import DTensor
    local = local_part(p)
    return DTensor.from_local(part.to(local.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
