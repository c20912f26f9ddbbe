"""Hugging Face model folders in bitsandbytes' 4-bit format (or HQQ's): write them, and read their config.

A folder holds config.json (with `quantization_config`, quant_method "bitsandbytes"),
model.safetensors (the AdaptedLinear layers' state dict: bitsandbytes' keys for every 4-bit weight, plain
tensors for the rest; adapters are never part of it) and the tokenizer files. transformers +
bitsandbytes load it as they load their own; `qforge.model.load.load_model` loads it without
requantising. Every folder is written atomically (qforge.fileio) and never over a non-empty one.

An HQQ folder (layers over qforge.nn.HQQBase, quant_type hqq4/hqq3/hqq2) is the same but for the
quantised layers: config.json's `quantization_config` is transformers' HqqConfig dict
{"quant_method": "hqq", "quant_config": {"weight_quant_params": {"nbits", "group_size", "axis",
...}, ...}, "skip_modules": [...]} (qforge.quant.hqq.hqq_quantization_config), and model.safetensors
holds each quantised layer under the `hqq` package's HQQLinear.state_dict() keys at the module path
(`P.W_q`, `P.scale`, `P.zero`, `P.nbits`, `P.group_size`, `P.shape`, `P.axis`, ..., `P.bias`; the
layout is documented in qforge/quant/hqq.py), as transformers' HQQ integration and the package's
`save_to_safetensors` write them. (The package's own `save_quantized` pickles a `qmodel.pt` with
torch.save: not a format to load from untrusted folders, so qforge neither writes nor reads it.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ..fileio import atomic_folder
from ..nn.experts import AdaptedExperts, ExpertBank
from .surgery import hqq_layers, linear_names, quantized_layers
from ..quant.state import dtype_name

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def write_new_folder(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary sibling of `out_dir`, then move it into place atomically
    (qforge.fileio.atomic_folder: fsync, rename). `out_dir` may be missing or empty; a non-empty one
    is a ValueError and is left alone."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"'{out_dir}' already exists and is not an empty folder; remove it first")

    return atomic_folder(out_dir, write, markers=())


# ---- quantization_config ------------------------------------------------------------------------
def read_bnb_config(config) -> dict | None:
    """The folder's `quantization_config` as a dict when it describes bitsandbytes 4-bit, else None.
    A bitsandbytes 8-bit config is a ValueError: qforge reads only 4-bit checkpoints."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        return None
    if not qc.get("load_in_4bit"):
        raise ValueError("quantization_config describes bitsandbytes 8-bit weights; only 4-bit folders can be loaded")
    return qc


def _skip_patterns(model: nn.Module) -> list[str]:
    """Linear layers left unquantised, as transformers' `llm_int8_skip_modules` patterns: a leaf name
    (e.g. "lm_head") when no layer of that leaf name is quantised, else the full module names."""
    plain = [n for n in linear_names(model) if isinstance(model.get_submodule(n), nn.Linear)]  # not the adapters' own
    return skip_patterns(plain, [n for n, _ in quantized_layers(model)])


def skip_patterns(plain: list[str], quantised: list[str]) -> list[str]:
    """_skip_patterns from the names of the plain and of the quantised linear layers."""
    quantised_leaves = {n.rsplit(".", 1)[-1] for n in quantised}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in plain})
    return [leaf for leaf in leaves if leaf not in quantised_leaves] + \
           [n for n in plain if n.rsplit(".", 1)[-1] in quantised_leaves]


def build_bnb_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                     skip_modules: list[str]) -> dict:
    """config.json's quantization_config as transformers writes it for bitsandbytes 4-bit; the
    linear layers kept dense are named in llm_int8_skip_modules so transformers leaves them so."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant type '{quant_type}' has no bitsandbytes equivalent (nf4 or fp4)")
    return {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False,
            "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": bool(double_quant),
            "bnb_4bit_compute_dtype": dtype_name(compute_dtype), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": list(skip_modules), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def quantization_config_for(model: nn.Module, quant_type: str | None = None,
                            compute_dtype: torch.dtype | None = None) -> dict:
    """The `quantization_config` transformers + bitsandbytes expect for `model`'s 4-bit layers (or,
    with quant_type, for the same layers requantised to it). Every 4-bit layer must share one quant
    type, double-quant setting and compute dtype."""
    layers = [m for _, m in quantized_layers(model)]
    if not layers:
        raise ValueError("the model has no 4-bit layers to describe in a bitsandbytes quantization_config")
    kinds = {(m.base.quant_state.quant_type, m.base.quant_state.nested, m.compute_dtype) for m in layers}
    if len({k[1] for k in kinds}) > 1 or (quant_type is None and len(kinds) != 1):
        raise ValueError(f"the 4-bit layers mix settings {sorted(map(str, kinds))}; bitsandbytes' config holds one")
    own_type, nested, own_dtype = kinds.pop()
    return build_bnb_config(quant_type or own_type, nested, compute_dtype or own_dtype, _skip_patterns(model))


def hqq_config_for(model: nn.Module, nbits: int | None = None, group_size: int | None = None) -> dict:
    """config.json's `quantization_config` for `model`'s HQQ layers (or, with nbits and group_size,
    for the model's quantised layers requantised to HQQ): one setting for all; the linear layers
    kept dense are named in skip_modules (leaf names, as transformers' HqqConfig takes them)."""
    from ..quant.hqq import hqq_quantization_config

    layers = [m for _, m in hqq_layers(model)]
    kinds = {(m.base.hqq_state.nbits, m.base.hqq_state.group_size, m.base.hqq_state.axis) for m in layers}
    if nbits is None:
        if len(kinds) != 1:
            raise ValueError("the model's HQQ layers " + (f"mix settings {sorted(kinds)}" if kinds else "are none")
                             + "; an HQQ quantization_config holds one")
        nbits, group_size, axis = kinds.pop()
    else:
        axis = 1
    quantised = {n.rsplit(".", 1)[-1] for n, _ in list(hqq_layers(model)) + list(quantized_layers(model))}
    plain = {n.rsplit(".", 1)[-1] for n in linear_names(model) if isinstance(model.get_submodule(n), nn.Linear)}
    return hqq_quantization_config(nbits, group_size or 64, axis, tuple(sorted(plain - quantised)))


# ---- writing ------------------------------------------------------------------------------------
def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapters, tied duplicates written once (the first name, as
    transformers does: embed_tokens, not lm_head), every tensor contiguous with its own storage."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    duplicates = {n for names in names_of.values() for n in names[1:]}
    banks = _expert_banks(model)
    owner_of = {key: name for name, (keys, _) in banks.items() for key in keys}
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if ".adapters." in key or key.startswith("adapters.") or key in duplicates:
            continue
        owner = owner_of.get(key)
        if owner is not None:  # 4-bit experts: one bitsandbytes weight per expert (loader: stored_expert_bank)
            if key == owner:
                out.update({k: v.detach().cpu() for k, v in banks[owner][1].expert_state_dicts(owner).items()})
            continue
        tensor = tensor.detach().contiguous().cpu()  # a model on a GPU is written from host copies
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _expert_banks(model: nn.Module) -> dict:
    """Fused expert parameter name -> (its state-dict keys, its 4-bit ExpertBank)."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, AdaptedExperts):
            for pname, bank in module.banks.items():
                if isinstance(bank, ExpertBank):
                    name = f"{mname}.{pname}" if mname else pname
                    out[name] = ({name + suffix for suffix in bank.tensors()}, bank)
    return out


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `model` (with 4-bit AdaptedLinear layers) as a bitsandbytes 4-bit Hugging Face folder
    (HQQ layers: an HQQ folder, see the module docstring).

    out_dir/config.json      the model config plus `quantization_config` (quantization_config_for)
    out_dir/model.safetensors every tensor but the adapters; 4-bit weights under bitsandbytes' keys
    out_dir/generation_config.json, and out_dir/tokenizer* when `tokenizer` is given (the chat
    template inside tokenizer_config.json)
    Returns out_dir. ValueError when out_dir exists and is not empty.
    """
    qconfig = hqq_config_for(model) if any(True for _ in hqq_layers(model)) else quantization_config_for(model)
    tensors = quantized_state_dict(model)
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["dtype"] = dtype_name(model.get_input_embeddings().weight.dtype)
    config.pop("torch_dtype", None)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tokenizer(tokenizer, tmp, getattr(model, "generation_config", None))

    return write_new_folder(out_dir, write)


def save_tokenizer(tokenizer, folder: Path, generation_config=None) -> None:
    """tokenizer.json + tokenizer_config.json, the chat template kept inside tokenizer_config.json
    (read by every transformers version) rather than only in a separate chat_template.jinja; and
    generation_config.json. The chat template's end of turn is written as an end token in both
    (templates.with_end_of_turn). `tokenizer` None: only the generation config, as it is."""
    from .templates import with_end_of_turn

    if tokenizer is None:
        if generation_config is not None:
            generation_config.save_pretrained(str(folder))
        return
    tokenizer, generation_config = with_end_of_turn(tokenizer, generation_config)
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))
    try:
        tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    except TypeError:  # transformers without the keyword: the template is in tokenizer_config.json already
        tokenizer.save_pretrained(str(folder))
