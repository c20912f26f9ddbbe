"""Shard a QLoRA model's 4-bit base across ranks with FSDP2 (`fully_shard`).

What is sharded: every 4-bit layer's packed codes and absmax, moved into a float storage
(its base becomes a `qforge.nn.ShardedQuant4bitBase`: the same bytes in frozen 1-D Parameters, zero-padded to a whole
element; FSDP pads dim 0 of the last rank's chunk itself). One FSDP group per transformer block
(each item of the model's layer list) gathers that block's codes just before its forward and again
before its backward, and frees them after; the root group covers any 4-bit layer outside the blocks.

What is not: the LoRA parameters and every other weight (embeddings, norms, biases) are passed to
`fully_shard` as `ignored_params`, so each rank holds them whole. For LoRA this is a choice: the
adapters are under 1 % of the base, the loop sums their gradients itself (Group.sum_gradients),
and every rank then takes the same optimiser step on whole tensors, so the 8-bit AdamW sees the
blocks and sizes of a single-process run and a checkpoint is the same file whatever the number of
processes. Sharding them instead would cut the 8-bit optimiser's 256-value blocks at shard edges
and change its numbers with the world size. The collectives FSDP runs are then all-gathers only
(the frozen base has no gradient to reduce-scatter); gloo has both all_gather_into_tensor and
reduce_scatter_tensor on the CPU in torch 2.13, so neither choice was forced by the backend.
FSDP gathers a group of mixed dtypes as bytes; the float storage keeps the codes' group in one
dtype all the same, and nothing ever rounds or converts them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.surgery import quantized_layers
from ..nn import AdaptedLinear, ShardedQuant4bitBase
from ..nn.bases import is_sharded
from ..nn.sharded_experts import shard_banks
from .group import Group


def quantised_layers(model: nn.Module) -> list[AdaptedLinear]:
    """The layers whose base is 4-bit codes, in either storage (plain or sharded)."""
    return [layer for _, layer in quantized_layers(model)]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: items of any ModuleList that hold a 4-bit layer."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found += [b for b in module if quantised_layers(b)]
    return found


def shard_base(model: nn.Module, group: Group, storage_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Shard the 4-bit base of `model` across `group` in place (FSDP2); everything else stays whole
    on every rank and moves to the group's device. Call after the adapters are attached and the
    model is prepared for training (that step casts norms, which must not touch the codes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = quantised_layers(model)
    if not layers:
        raise ValueError("shard_base: the model has no 4-bit layers to shard (method qlora is needed)")
    for layer in layers:
        if not layer.base.shardable:
            raise ValueError("shard_base: the model's 4-bit base is sharded already")
        layer.set_base(layer.base.to_sharded(storage_dtype))
    storage = {id(p) for layer in layers for p in (layer.weight, layer.weight_absmax)}
    storage |= {id(p) for p in shard_banks(model, storage_dtype)}  # MoE: 4-bit expert banks too
    whole = {p for p in model.parameters() if id(p) not in storage}
    mesh = init_device_mesh(group.device.type, (group.world,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    if group.device.type != "cpu":
        move_whole_tensors(model, group.device)
    return model


def move_whole_tensors(model: nn.Module, device: torch.device) -> None:
    """Move what FSDP left alone (ignored parameters, buffers, 4-bit constants) to `device`."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not is_sharded(p) and p.device != device:
                p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                module._buffers[name] = b.to(device)
        if isinstance(module, AdaptedLinear) and isinstance(module.base, ShardedQuant4bitBase):
            module.base.moved()


def local_quantised_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit storage this rank holds, bytes of the whole 4-bit storage): the packed codes
    and absmax of every 4-bit layer, as this rank's shards, and as the unsharded tensors."""
    held = whole = 0
    for layer in quantised_layers(model):
        if isinstance(layer.base, ShardedQuant4bitBase):
            tensors = layer.base.held_tensors()
        else:
            state = layer.base.quant_state
            tensors = [(t, t) for t in (state.packed, state.absmax)]
        for local, full in tensors:
            held += local.numel() * local.element_size()
            whole += full.numel() * full.element_size()
    return held, whole
