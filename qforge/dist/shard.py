"""Shard a QLoRA model across ranks with FSDP2 (`fully_shard`): every rank holds 1/N of everything.

One FSDP group per transformer block (each item of the model's layer list) holds that block's 4-bit
codes and absmax (moved into a float storage: its base becomes a `qforge.nn.ShardedQuant4bitBase`, the
same bytes in frozen 1-D Parameters, zero-padded to a whole element), its adapters (LoRA A and B,
DoRA's magnitudes), its norms and any other weight it has; the root group holds what is left: the
embeddings, the final norm, the output layer (one Parameter when tied to the embeddings: FSDP shards
it once) and any 4-bit layer outside the blocks. Each group is gathered just before its forward and
again before its backward, and freed after; the adapters' gradients are reduce-scattered in float32
as a SUM (FSDP's default is a mean: the loop weights each rank's loss by its share of the global
batch, so the sum is the single-process gradient), so each rank's optimiser steps only its shard.

The 8-bit AdamW quantises its state in blocks of 256 values of the flattened parameter. FSDP cuts
dim 0 into chunks of ceil(rows / N) rows; when a chunk's values are a multiple of the block size
every shard starts on a block boundary and the sharded step is bit-identical to the whole one.
A trainable parameter with 8-bit state whose chunks are not (`keeps_blocks`) stays whole on every
rank, as everything did before (ignored by FSDP; the loop sums its gradient, Group.sum_gradients),
and `whole_parameters` names it. gloo has all_gather_into_tensor and reduce_scatter_tensor on the
CPU in torch 2.13; FSDP gathers a group of mixed dtypes as bytes and never converts the codes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.surgery import quantized_layers
from ..optim.adamw8bit import BLOCK_SIZE, MIN_8BIT_SIZE
from ..nn import AdaptedLinear, ShardedQuant4bitBase
from ..nn.bases import is_sharded
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
    """Shard the 4-bit base of `model` across `group` in place (FSDP2): `shard_block` for every
    transformer block, then `shard_root` over the rest. Call after the adapters are attached and the
    model is prepared for training (that step casts norms, which must not touch the codes)."""
    if not quantised_layers(model):
        raise ValueError("shard_base: the model has no 4-bit layers to shard (method qlora is needed)")
    for block in blocks(model):
        shard_block(block, group, storage_dtype)
    shard_root(model, group, storage_dtype)
    return model


def shard_block(block: nn.Module, group: Group, storage_dtype: torch.dtype = torch.bfloat16) -> None:
    """Shard one transformer block in place as one FSDP2 group: its 4-bit bases move into sharded
    float storage (`storage_dtype`), its adapters, norms and every other parameter are sharded too
    (but for a trainable one whose shards would cut the optimiser's blocks: `keeps_blocks`)."""
    _to_sharded_storage(quantised_layers(block), storage_dtype)
    _fully_shard(block, group)


def shard_root(model: nn.Module, group: Group, storage_dtype: torch.dtype = torch.bfloat16) -> None:
    """The root FSDP2 group over what `shard_block` left (embeddings, final norm, output layer, 4-bit
    layers outside the blocks); what stays whole moves to the group's device."""
    _to_sharded_storage([layer for layer in quantised_layers(model) if layer.base.shardable], storage_dtype)
    _fully_shard(model, group)
    if group.device.type != "cpu":
        move_whole_tensors(model, group.device)


def _fully_shard(module: nn.Module, group: Group) -> None:
    """fully_shard `module` (one group over its parameters not in a group yet), gradients reduced in
    float32 as a sum over the ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    whole = {p for p in module.parameters() if not is_sharded(p) and not keeps_blocks(p, group.world)}
    fully_shard(module, mesh=mesh_of(group), ignored_params=whole or None,
                mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    module.set_gradient_divide_factor(1.0)  # a sum, not FSDP's mean over the ranks
    module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: plain SUM, divided by 1


def keeps_blocks(p: torch.Tensor, world: int, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> bool:
    """True when FSDP's dim-0 chunks of `p` over `world` ranks can be stepped apart: `p` is frozen,
    its optimiser state is 32-bit (element-wise, any cut will do), or each chunk of ceil(rows / world)
    rows is a whole number of the 8-bit state's blocks. A 0-d parameter has no dim 0 to cut."""
    if p.dim() == 0:
        return False
    if not p.requires_grad or p.numel() < min_8bit_size:
        return True
    rows = -(-p.shape[0] // world)
    return rows * (p.numel() // p.shape[0]) % block_size == 0


def whole_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters every rank holds whole after sharding (not DTensors)."""
    return [name for name, p in model.named_parameters() if not is_sharded(p)]


def _to_sharded_storage(layers: list[AdaptedLinear], storage_dtype: torch.dtype) -> set[int]:
    """Give each 4-bit layer of `layers` its sharded float storage; the ids of those Parameters."""
    for layer in layers:
        if not layer.base.shardable:
            raise ValueError("shard_base: the model's 4-bit base is sharded already")
        layer.set_base(layer.base.to_sharded(storage_dtype))
    return {id(p) for layer in layers for p in (layer.weight, layer.weight_absmax)}


def mesh_of(group: Group):
    """The 1-D device mesh of `group`'s ranks (over the default process group: cheap to build again)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(group.device.type, (group.world,))


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


def held_bytes(model: nn.Module, optimizer=None) -> dict[str, int]:
    """This rank's bytes by component (base, adapters, gradients, optimizer, embeddings, experts) and
    each as `<key>_whole` for the whole model: see qforge.dist.held."""
    from .held import held_bytes as count
    return count(model, optimizer)
