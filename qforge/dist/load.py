"""Sharded loading: each rank of a run reads, quantises and keeps only its shard of the model.

    skeleton (meta device) --prepare_skeleton--> the model-wide switches (attributes, hooks)
      for each transformer block, in order:
        read its tensors from the safetensors shards (a target weight quantised, or a bitsandbytes
        folder's 4-bit codes read as stored) --prepare_block--> adapters, casts
        --shard_block--> the rank keeps its 1/N chunk; the block's whole tensors are freed
      the rest (embeddings, final norm, output layer) still on meta --prepare_root--> --shard_root-->
        then each of its tensors read alone: a sharded one only for this rank's rows (a byte range
        of its file), so the embeddings and output layer are never whole on a rank

So a rank's memory during load is its shards of what is done plus one block whole, instead of the
whole 4-bit model on every rank. Every rank still reads and quantises every block (the memory is
divided by N, the work is not).
The callbacks belong to the caller (the training run, qforge.train.sharded_load): adapters are
created block by block in the order a one-process run creates them all at once, so with the same
seed their initial values are the same.

Only nf4/fp4 bases of a Hugging Face folder (plain or bitsandbytes 4-bit) load this way; an HQQ
base, a GGUF file or a mixture-of-experts model raises NotShardable before anything is read, and
the caller loads the whole model and shards it after (qforge.dist.shard.shard_base).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..model import load as model_load
from ..model.checkpoint import read_bnb_config
from ..model.conversion import convert_checkpoint, expert_parameter_names, router_linear_names
from ..model.surgery import DEFAULT_SKIP, linear_names, select_targets, set_module
from .consolidate import row_range
from .group import Group
from .shard import shard_block, shard_root

ModuleHook = Callable[[nn.Module], None]


class NotShardable(ValueError):
    """This model or setting loads whole and is sharded after; raised before anything is read."""


# ---- what a rank holds ------------------------------------------------------------------------
def held_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage `model` holds on this rank: parameters and buffers (a
    sharded parameter counts its local chunk, a meta tensor nothing) and the 4-bit layers' codes,
    absmax and constants. Storage bytes, so padding and views count as what they occupy."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is None:
            return
        t = getattr(t, "_local_tensor", t)  # a DTensor: this rank's chunk
        if t.is_meta:
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            add(t)
        state = getattr(getattr(module, "base", None), "quant_state", None)
        if state is not None and hasattr(state, "packed"):
            for t in (state.packed, state.absmax, state.code, state.nested_absmax, state.nested_code):
                add(t)
    return sum(seen.values())


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory (RssAnon of /proc/self/status), 0 where absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class LoadMeter:
    """Sampled where a rank's memory peaks (a block read whole, just before it is sharded) and after
    each shard: `peak_held` counts the model's tensors (held_tensor_bytes), `peak_rss_anon` the
    process's anonymous memory, `rss_anon_before` that before loading; `largest_transient` the
    largest block held whole (with its adapters); `held_after` what the rank keeps once loaded."""
    rss_anon_before: int = field(default_factory=rss_anon_bytes)
    peak_held: int = 0
    peak_rss_anon: int = 0
    largest_transient: int = 0
    held_after: int = 0
    trainable: int = 0  # trainable elements (PEFT's count), summed before each block is sharded
    total: int = 0  # every element: the skeleton's (a 4-bit weight as out x in) and the adapters'
    samples: list = field(default_factory=list)  # (where, held bytes, RssAnon bytes)

    def sample(self, model: nn.Module, where: str) -> int:
        held, rss = held_tensor_bytes(model), rss_anon_bytes()
        self.peak_held, self.peak_rss_anon = max(self.peak_held, held), max(self.peak_rss_anon, rss)
        self.samples.append((where, held, rss))
        return held

    def as_dict(self) -> dict:
        return {"load_peak_held_bytes": self.peak_held, "load_peak_rss_anon_bytes": self.peak_rss_anon,
                "load_rss_anon_before_bytes": self.rss_anon_before, "load_largest_whole_block_bytes":
                self.largest_transient, "held_after_load_bytes": self.held_after}


# ---- the loader -------------------------------------------------------------------------------
def _resolve_folder(source, quant: dict, target_modules, revision) -> Path:
    """The model folder of `source` ("smollm2": its cached bitsandbytes folder; ranks that find it
    missing build it at once, as one-process loads do: qforge.model.load._cached). NotShardable for a
    GGUF file."""
    path, is_gguf = model_load.resolve_path(model_load.resolve_source(source, revision), True, quant,
                                            target_modules == "all-linear")
    if is_gguf:
        raise NotShardable(f"'{path}' is a GGUF file: its loader needs the whole model")
    return path


def block_prefixes(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, block) of each transformer block: the items of a ModuleList that hold a target layer,
    in module order (as qforge.dist.shard.blocks finds them once they hold 4-bit layers)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, item in enumerate(module):
                prefix = f"{name}.{i}." if name else f"{i}."
                if any(t.startswith(prefix) for t in targets):
                    found.append((prefix, item))
    return found


def _targets(model: nn.Module, ckpt, prequantised: bool, target_modules) -> list[str]:
    """The layers that become 4-bit, as qforge.model.load.load_folder chooses them."""
    if prequantised:
        return model_load._bnb_targets(ckpt)
    routers = set(router_linear_names(model))
    return [n for n in select_targets(linear_names(model), target_modules, DEFAULT_SKIP) if n not in routers]


def _check_shardable(model: nn.Module, config, quant: dict, blocks: list[tuple[str, nn.Module]]) -> None:
    if quant["quant_type"] not in ("nf4", "fp4"):
        raise NotShardable(f"quant_type {quant['quant_type']}: only an nf4/fp4 base loads sharded")
    if model_load.read_hqq_config(config) is not None:
        raise NotShardable("an HQQ folder loads whole")
    if expert_parameter_names(model):
        raise NotShardable("mixture-of-experts banks load whole and are sharded after")
    if not blocks:
        raise NotShardable("no transformer blocks hold a 4-bit layer")
    for prefix, block in blocks:  # a computed buffer inside a block would need the model's init
        for name, buf in block.named_buffers():
            if buf.is_meta:
                raise NotShardable(f"block {prefix[:-1]} holds a computed buffer ({name})")


def load_sharded(source, group: Group, quant: dict, compute_dtype: torch.dtype, storage_dtype: torch.dtype,
                 target_modules="all-linear", keep_float32: bool = False, revision: str | None = None,
                 prepare_skeleton: ModuleHook | None = None, prepare_block: ModuleHook | None = None,
                 prepare_root: ModuleHook | None = None, meter: LoadMeter | None = None):
    """(model, tokenizer or None): `source` loaded block by block on `group.device`, each block
    sharded across `group` (shard_block) as soon as it is read, then the root (shard_root).
    `quant`: quant_type (nf4/fp4), blocksize, double_quant, as for qforge.model.load.load_model
    (a bitsandbytes folder's own setting wins). The hooks run on the meta skeleton before any read,
    on each whole block before it is sharded, and on the model before the root is sharded.
    `meter` records this rank's peaks. NotShardable before any tensor is read when the model or
    setting does not load this way."""
    device, meter = group.device, meter if meter is not None else LoadMeter()
    folder = _resolve_folder(source, quant, target_modules, revision)
    config = model_load.read_config(folder)
    prequantised = read_bnb_config(config) is not None
    model = model_load.build_skeleton(config, compute_dtype)
    ckpt = convert_checkpoint(model_load.Checkpoint(folder), model)
    targets = _targets(model, ckpt, prequantised, target_modules)
    blocks = block_prefixes(model, targets)
    _check_shardable(model, config, quant, blocks)
    if prepare_skeleton is not None:
        prepare_skeleton(model)
    skeleton = sum(p.numel() for p in model.parameters())  # tied weights once, as PEFT counts
    wide = model_load.float32_residual_names(model) if keep_float32 else frozenset()
    tied = model_load.tied_names(model)

    def quantise(names: list[str]) -> None:
        for name in names:  # each target quantised (or read as stored) and placed, one at a time
            linear = model.get_submodule(name)
            layer = model_load.quantised_layer(ckpt, name, linear, tied.get(name + ".weight", [name + ".weight"]),
                                               prequantised, quant, compute_dtype, device)
            set_module(model, name, layer)
            model_load.release_free_memory()

    inside = set()
    for prefix, block in blocks:
        names = [t for t in targets if t.startswith(prefix)]
        inside.update(names)
        quantise(names)
        model_load._materialise(model, ckpt, compute_dtype, device, wide, within=prefix)
        if prepare_block is not None:
            prepare_block(block)
        meter.trainable += sum(p.numel() for p in block.parameters() if p.requires_grad)
        meter.largest_transient = max(meter.largest_transient, held_tensor_bytes(block))
        meter.sample(model, prefix[:-1])
        shard_block(block, group, storage_dtype)
        model_load.release_free_memory()
    quantise([t for t in targets if t not in inside])  # 4-bit layers outside the blocks (an adapted lm_head)
    if prepare_root is not None:
        prepare_root(model)  # the root's other tensors are still on meta: flags and dtypes only
    meter.trainable += sum(p.numel() for n, p in model.named_parameters()
                           if p.requires_grad and not any(n.startswith(prefix) for prefix, _ in blocks))
    meter.total = skeleton + meter.trainable  # fresh adapters are all trainable
    fill_meta_buffers(model, ckpt, compute_dtype, device)  # before shard_root moves buffers to the device
    shard_root(model, group, storage_dtype)
    fill_meta_parameters(model, ckpt, compute_dtype, device, wide, meter)
    model_load._init_computed_buffers(model, device)  # nothing is left on meta: a check
    meter.sample(model, "root")
    model_load.release_free_memory()
    meter.held_after = meter.sample(model, "loaded")
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval(), model_load.load_tokenizer(folder)


# ---- the root: each tensor read alone, and only this rank's rows of a sharded one ----------------
def fill_meta_buffers(model: nn.Module, ckpt, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Buffers still on meta: a persistent one read from the checkpoint; the others (rotary
    inv_freq) recomputed by the model's `_init_weights`, as qforge.model.load does."""
    names = {id(b): n for n, b in model.named_buffers() if b is not None and b.is_meta}
    for module in model.modules():
        computed = False
        for k, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            name = names[id(buf)]
            if k not in module._non_persistent_buffers_set and name in ckpt:
                stored = ckpt.read(name)
                module._buffers[k] = stored.to(device).to(model_load.target_dtype(stored, compute_dtype))
            else:
                module._buffers[k], computed = torch.empty_like(buf, device=device), True
        if computed and hasattr(model, "_init_weights"):
            model._init_weights(module)


def fill_meta_parameters(model: nn.Module, ckpt, compute_dtype: torch.dtype, device: torch.device,
                         float32_names=frozenset(), meter: LoadMeter | None = None) -> None:
    """Give every parameter still on meta (the root's, after shard_root) its values, one tensor at a
    time: a sharded one (FSDP's dim-0 chunk) only this rank's rows, read from the file alone where
    the checkpoint names it as the model does; a whole one all of it. Values go through the dtype
    qforge.model.load gives them (compute_dtype, or float32 for `float32_names`) and then the
    parameter's own (a norm upcast for training), as loading then casting would. The Parameter
    objects stay (swapped in place), so FSDP and tied modules keep theirs."""
    tied, done = model_load.tied_names(model), set()
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        local = getattr(param, "_local_tensor", param)
        if not local.is_meta or id(param) in done:
            continue
        done.add(id(param))
        names = tied.get(name, [name])
        key = ckpt.first_present(names)
        wide = any(n in float32_names for n in names)
        if local is param:
            tensor = ckpt.read(key)
            expected = tuple(param.shape)
        else:
            first, rows = row_range(param)
            tensor = read_rows(ckpt, key, first, first + rows)
            expected = (rows, *param.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"tensor '{key}' gives shape {list(tensor.shape)}, the model expects {list(expected)}")
        tensor = tensor.to(device).to(torch.float32 if wide else model_load.target_dtype(tensor, compute_dtype))
        tensor = tensor.to(param.dtype)
        if local is not param:
            from torch.distributed.tensor import DTensor
            tensor = DTensor.from_local(tensor.contiguous(), param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())
        torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=param.requires_grad))
        param._is_hf_initialized = True  # transformers' init functions leave it alone
        if meter is not None:
            meter.sample(model, name)


def read_rows(ckpt, key: str, first: int, stop: int) -> torch.Tensor:
    """Rows [first, stop) of tensor `key`: read alone from its file where the checkpoint holds the
    key as it is (the bytes of a dim-0 range are contiguous), else sliced from the whole tensor."""
    import os
    file = getattr(ckpt, "where", {}).get(key)
    if file is None:  # a converted name (merged or renamed): the whole tensor, transiently
        return ckpt.read(key)[first:stop].clone()
    info = file.tensors[key]
    row = torch.Size(info.shape[1:]).numel() * info.dtype.itemsize
    buf = torch.empty((stop - first) * row, dtype=torch.uint8)
    view, done, start = memoryview(buf.numpy()), 0, info.start + first * row
    with open(file.path, "rb", buffering=0) as f:
        while done < buf.numel():
            got = os.preadv(f.fileno(), [view[done:]], start + done)
            if got <= 0:
                raise ValueError(f"'{file.path}' is truncated: short read in tensor '{key}'")
            done += got
    return buf.view(info.dtype).reshape(stop - first, *info.shape[1:])
