"""The model a server serves: a folder's weights as stored, or quantised at load.

    source --stored_format--> bitsandbytes 4-bit | HQQ       -> read as stored (the flag does not matter)
                              compressed-tensors              -> qforge.model.compressed (as stored)
                              plain weights (or GGUF, smollm2) -> quant_type "none": dense in the dtype
                                                                  quant_type nf4/fp4/hqq*: quantised now

Every target Linear of the served model is an AdaptedLinear (a dense base for "none"), so adapters
sit on top whatever the base. `base_record` (qforge.adapters.base_record) says what was served.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SERVE_QUANT_TYPES = ("nf4", "fp4", "hqq4", "hqq3", "hqq2", "none")  # "none": weights as stored, in the dtype


def stored_format(folder: Path) -> str | None:
    """The quantised format a model folder's config.json declares ("bitsandbytes", "hqq",
    "compressed-tensors", ...), or None for plain weights (and for anything that is not a folder)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") if isinstance(qc, dict) else None


def load_serving_model(source, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str | None = None, revision: str | None = None):
    """(model, tokenizer or None) to serve `source` (see qforge.model.load.load_model for the
    sources). A folder stored quantised (bitsandbytes 4-bit, HQQ, compressed-tensors) is served as
    stored whatever `quant_type`; otherwise `quant_type` "none" keeps every weight as stored, cast
    to `compute_dtype` (float32 keeps float32 checkpoints exact), and the others quantise the target
    Linear layers at load (blocksize 64, double quant; HQQ group size 64) as training does."""
    from .load import SMOLLM2, load_model, resolve_source

    if quant_type not in SERVE_QUANT_TYPES:
        raise ValueError(f"quant_type: expected one of {', '.join(SERVE_QUANT_TYPES)}, got {quant_type!r}")
    source = resolve_source(source, revision)
    is_folder = not (isinstance(source, str) and source.lower() == SMOLLM2) and Path(source).expanduser().is_dir()
    stored = stored_format(Path(source).expanduser()) if is_folder else None
    if stored == "compressed-tensors":
        return _load_compressed(Path(source).expanduser(), compute_dtype, device)
    if stored not in (None, "bitsandbytes", "hqq"):
        raise ValueError(f"'{source}' stores '{stored}' weights (config.json quantization_config), which qforge "
                         "does not serve; serve the dense model, or a bitsandbytes 4-bit, HQQ or compressed-tensors "
                         "folder")
    if quant_type != "none" or stored is not None:  # a quantised folder is read as stored by load_model
        quant = quant_type if quant_type != "none" else "nf4"
        return load_model(source, quant_type=quant, compute_dtype=compute_dtype, device=device)
    model, tokenizer = load_model(source, compute_dtype=compute_dtype, quantize=False, device=device)
    dense_targets(model, compute_dtype)
    return model, tokenizer


def dense_targets(model: torch.nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """The Linear layers adapters may sit on (all but the output layer and MoE routers) become
    AdaptedLinear over their own dense weight (no copy beyond a dtype cast). Returns their names."""
    from . import surgery
    from .conversion import router_linear_names

    routers = set(router_linear_names(model))
    targets = [n for n in surgery.select_targets(surgery.linear_names(model), "all-linear") if n not in routers]
    surgery.dense_lora_linears(model, targets, compute_dtype)
    return targets


def _load_compressed(folder: Path, compute_dtype: torch.dtype, device):
    """A compressed-tensors folder (GPTQ/AWQ W4A16, FP8), served as stored: qforge.model.compressed
    (the requantisation work) dequantises each layer as stored, the targets become dense
    AdaptedLinear for adapters. Where that module is missing, a clear refusal."""
    try:
        from .compressed import load_compressed_tensors
    except ImportError:
        raise ValueError(f"'{folder}' is a compressed-tensors folder: compressed-tensors folders are not "
                         "served yet") from None
    from .load import load_tokenizer

    model = load_compressed_tensors(folder, dtype=compute_dtype, device=device if device is not None else "cpu")
    dense_targets(model, compute_dtype)
    return model, load_tokenizer(folder)
