"""`qforge quantize` of a model folder without holding the model: read, quantise, write, drop.

load_model + save_quantized hold the whole 4-bit model before writing it (Llama-3.1-8B: 5.7 GB,
0.36 of its bf16 checkpoint). quantize_folder writes the same folder holding at most one shard of
output (SHARD_BYTES) plus the tensor being read: each target Linear's weight is read, quantised
(on `device`) and its bitsandbytes tensors queued for the current shard; every other tensor is read
and cast to the compute dtype; a full shard is written and freed. The result is save_quantized's
folder, tensor for tensor (tests/model/test_stream_quantize.py), as model.safetensors when it fits
one shard, else as transformers' sharded layout (model-0000i-of-0000N.safetensors + the index).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME, WEIGHTS_NAME, build_bnb_config, save_tokenizer, skip_patterns, write_new_folder
from .load import (CPU, Checkpoint, progress_bar, quantised_layer, read_config, target_dtype, tied_names,
                   build_skeleton, load_tokenizer, release_free_memory)
from .conversion import convert_checkpoint, expert_parameter_names, router_linear_names, takes_4bit_experts
from .surgery import DEFAULT_SKIP, linear_names, select_targets
from ..nn.experts import ExpertBank
from ..quant.state import dtype_name

SHARD_BYTES = 2 * 10**9  # output held before it is written; transformers' own default shard is 5 GB


class _ShardWriter:
    """Tensors in, safetensors shards out, each written once it reaches SHARD_BYTES."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.parts = 0, []  # parts: (temporary file name, its keys, its bytes)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to(CPU).contiguous()
        self.pending[key] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.parts) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.parts.append((name, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0
        release_free_memory()

    def finish(self) -> None:
        """Name the parts as transformers does: one model.safetensors, or shards and their index."""
        self.flush()
        if len(self.parts) == 1:
            (self.folder / self.parts[0][0]).rename(self.folder / WEIGHTS_NAME)
            return
        weight_map, n = {}, len(self.parts)
        for i, (part, keys, _) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / part).rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": sum(p[2] for p in self.parts)}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def quantize_folder(source: Path, out_dir, quant: dict, compute_dtype: torch.dtype, device: torch.device = CPU,
                    progress: bool = False, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write model folder `source` (Hugging Face safetensors, not already 4-bit) as a bitsandbytes
    4-bit folder at `out_dir` (new or empty; atomic): every linear layer but lm_head in 4 bits
    (`quant`: quant_type, blocksize, double_quant), the rest in `compute_dtype`, config.json with
    its quantization_config, the generation config and the tokenizer. Returns what was quantised:
    {"layers": count, "dense_bytes": their weights in the compute dtype, "packed_bytes": in 4 bits}."""
    config = read_config(source)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"'{source}' is already quantised (its config.json has a quantization_config)")
    if quant["quant_type"] not in ("nf4", "fp4"):
        raise ValueError(f"quantize_folder writes bitsandbytes nf4/fp4 folders, not {quant['quant_type']!r}")
    model = build_skeleton(config, compute_dtype)  # on meta: names, shapes, tied parameters
    ckpt = convert_checkpoint(Checkpoint(source), model)  # transformers' renames and expert merges
    names = linear_names(model)
    routers = set(router_linear_names(model))  # MoE routers stay dense, as load_folder keeps them
    targets = [n for n in select_targets(names, "all-linear", DEFAULT_SKIP) if n not in routers]
    experts = {n for n in expert_parameter_names(model) if takes_4bit_experts(model, n)}
    tied = tied_names(model)
    qconfig = build_bnb_config(quant["quant_type"], quant["double_quant"], compute_dtype,
                               skip_patterns([n for n in names if n not in targets], targets))
    out_config = model.config.to_dict()
    out_config["quantization_config"] = qconfig
    out_config["dtype"] = dtype_name(compute_dtype)
    out_config.pop("torch_dtype", None)
    generation = model.generation_config  # as load_folder: the folder's own when it has one
    if (source / "generation_config.json").is_file():
        from transformers import GenerationConfig
        generation = GenerationConfig.from_pretrained(str(source))

    summary = {"layers": 0, "dense_bytes": 0, "packed_bytes": 0}

    def write(tmp: Path) -> None:
        shards = _ShardWriter(tmp, shard_bytes)
        in_target = set()
        for name in progress_bar(targets, progress, "quantising"):
            linear = model.get_submodule(name)
            aliases = tied.get(name + ".weight", [name + ".weight"])
            layer = quantised_layer(ckpt, name, linear, aliases, False, quant, compute_dtype, device)
            for key, tensor in layer.state_dict().items():
                shards.add(f"{name}.{key}", tensor)
            in_target.update(f"{name}.{leaf}" for leaf, _ in linear.named_parameters())
            state = layer.base.quant_state
            summary["layers"] += 1
            summary["dense_bytes"] += state.numel * compute_dtype.itemsize
            summary["packed_bytes"] += state.nbytes()
            del layer
        written = set()
        for key, value in model.state_dict(keep_vars=True).items():  # model order, as save_quantized writes
            names_of = tied.get(key, [key])
            if key in in_target or any(n in written for n in names_of) or ".adapters." in key:
                continue
            tensor = ckpt.read(ckpt.first_present(names_of))
            if tuple(tensor.shape) != tuple(value.shape):
                raise ValueError(f"tensor '{key}' has shape {list(tensor.shape)}, the model expects {list(value.shape)}")
            if key in experts:  # 4-bit experts, one bitsandbytes weight per expert (load: stored_expert_bank)
                bank = ExpertBank.quantize(tensor.to(device), quant["quant_type"], quant["blocksize"],
                                           quant["double_quant"])
                for k, t in bank.expert_state_dicts(key).items():
                    shards.add(k, t)
                summary["dense_bytes"] += tensor.numel() * compute_dtype.itemsize
                summary["packed_bytes"] += bank.nbytes()
                del bank
            else:
                shards.add(key, tensor.to(target_dtype(tensor, compute_dtype)))
            written.add(key)
        shards.finish()
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        if generation is not None:
            generation.save_pretrained(str(tmp))
        tokenizer = load_tokenizer(source)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)

    write_new_folder(out_dir, write)
    return summary
