"""What this rank holds, by component: the figures the planner predicts and scale.py measures.

    base        the 4-bit codes and absmax (and their scales) of every 4-bit linear layer
    adapters    every trainable parameter (LoRA A and B, DoRA's magnitudes)
    gradients   their gradients as the optimiser reads them: FSDP's reduce-scattered shard, in the
                parameter's dtype (counted whether or not they are allocated at this moment:
                between steps they are freed)
    optimizer   the optimiser's state (AdamW8bit: 2 bytes a value + 8 bytes a 256-value block, or
                8 bytes a value below its min_8bit_size; without an optimizer, that prediction)
    embeddings  every other parameter: embeddings, output layer, norms, a frozen reference adapter
    experts     MoE expert banks (4-bit codes and scales, or their sharded float storage)

Each key also comes as `<key>_whole`: the same component of the whole model (one process's figure).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model.surgery import expert_layers
from ..nn.bases import is_sharded
from ..optim.adamw8bit import BLOCK_SIZE, MIN_8BIT_SIZE, local_part
from .shard import local_quantised_bytes, quantised_layers

COMPONENTS = ("base", "adapters", "gradients", "optimizer", "embeddings", "experts")


def held_bytes(model: nn.Module, optimizer=None) -> dict[str, int]:
    """This rank's bytes by component (module docstring) and each `<key>_whole`."""
    held = dict.fromkeys(COMPONENTS, 0)
    whole = dict.fromkeys(COMPONENTS, 0)
    held["base"], whole["base"] = local_quantised_bytes(model)
    expert_ids = _expert_tensors(model, held, whole)
    storage = {id(t) for layer in quantised_layers(model) for t in (layer.weight, layer.weight_absmax)}
    trainable = []
    for p in _unique_parameters(model):
        if id(p) in storage or id(p) in expert_ids:
            continue
        key = "adapters" if p.requires_grad else "embeddings"
        held[key] += _nbytes(local_part(p))
        whole[key] += _nbytes(p)
        if p.requires_grad:
            trainable.append(p)
    held["gradients"], whole["gradients"] = held["adapters"], whole["adapters"]
    held["optimizer"], whole["optimizer"] = _optimizer_bytes(trainable, optimizer)
    return {**held, **{f"{k}_whole": v for k, v in whole.items()}}


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    return list({id(p): p for p in model.parameters()}.values())  # a tied weight once


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _expert_tensors(model: nn.Module, held: dict, whole: dict) -> set[int]:
    """Count the MoE banks' frozen tensors into `held`/`whole`["experts"]; the ids of those that are
    Parameters (a sharded float storage), so they are not counted again as embeddings."""
    seen = set()
    for _, experts in expert_layers(model):
        tensors = [p for p in experts.parameters() if not p.requires_grad] + list(experts.buffers())
        for bank in experts.banks.values():
            tensors += [t for t in vars(bank).values() if torch.is_tensor(t)]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                held["experts"] += _nbytes(local_part(t))
                whole["experts"] += _nbytes(t)
    return seen


def _optimizer_bytes(trainable: list[torch.Tensor], optimizer) -> tuple[int, int]:
    """(this rank's, the whole model's) optimiser state bytes: measured from `optimizer` once it
    has state, else predicted for AdamW8bit."""
    predicted = [sum(_adamw8bit_state_bytes(p.numel(), local_part(p).numel() if local else p.numel())
                     for p in trainable) for local in (True, False)]
    values = [v for s in (optimizer.state.values() if optimizer is not None else ()) for v in s.values()
              if torch.is_tensor(v)]
    if not values:
        return predicted[0], predicted[1]
    held = sum(_nbytes(local_part(v)) for v in values)
    if any(is_sharded(v) for v in values) or not any(is_sharded(p) for p in trainable):
        return held, sum(_nbytes(v) for v in values)  # a DTensor's numel is the whole tensor's
    return held, predicted[1]  # AdamW8bit keeps plain tensors of its shards: the whole is its prediction


def _adamw8bit_state_bytes(whole_numel: int, numel: int) -> int:
    """AdamW8bit's state of a parameter with `whole_numel` values, `numel` of them on this rank."""
    if whole_numel < MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / BLOCK_SIZE)
