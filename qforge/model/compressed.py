"""Folders in the `compressed-tensors` format (what `qforge merge --requantize gptq|awq|fp8`
writes, and what llm-compressor writes for vLLM): recognised, and loaded as a dense transformers
model whose quantised linears hold their dequantised weights, one layer dequantised at a time
while the model is filled (so the model serves exactly the function stored, in `dtype`).

Read formats (config.json quantization_config.format, or per config group):
    pack-quantized   <m>.weight_packed int32 [out, ceil(in / 8)] (int4 + 8, eight per word),
                     <m>.weight_scale [out, in / group], <m>.weight_shape [2];
                     symmetric only (an asymmetric <m>.weight_zero_point is refused by name)
    float-quantized  <m>.weight float8_e4m3fn [out, in], <m>.weight_scale float32 [out, 1] (or [1])
Dequantisation follows the format: q * scale computed in the scale's dtype, then cast to `dtype`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..quant.fp8 import fp8_dequantize
from ..quant.int4_groups import dequantize_int4, unpack_int4
from .load import Checkpoint, _init_computed_buffers, _materialise, build_skeleton, read_config

FORMATS = ("pack-quantized", "float-quantized")


def _quantization_config(folder: str | Path) -> dict | None:
    """config.json's quantization_config of `folder`, or None (no folder, no config, none there)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    q = config.get("quantization_config") if isinstance(config, dict) else None
    return q if isinstance(q, dict) else None


def is_compressed_tensors(folder: str | Path) -> bool:
    """Whether `folder` holds a model whose config.json says quant_method "compressed-tensors"."""
    q = _quantization_config(folder)
    return bool(q) and q.get("quant_method") == "compressed-tensors"


class DequantizedCheckpoint(Checkpoint):
    """A compressed-tensors folder read as a dense checkpoint: `<m>.weight` of a quantised layer
    is dequantised from its stored tensors (in float32) when read; the stored pieces are hidden."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        stored = set(self.where)
        self.packed = {k[: -len(".weight_packed")] for k in stored if k.endswith(".weight_packed")}
        self.fp8 = {k[: -len(".weight")] for k in stored
                    if k.endswith(".weight") and f"{k}_scale" in stored and self.where[k].tensors[k].dtype
                    in (torch.float8_e4m3fn, torch.float8_e5m2)}
        zero = sorted(k for k in stored if k.endswith(".weight_zero_point"))
        if zero:
            raise ValueError(f"'{folder}': asymmetric int4 (tensor '{zero[0]}') is not supported; qforge reads "
                             "symmetric pack-quantized and float-quantized folders")
        hidden = {f"{m}.{p}" for m in self.packed for p in ("weight_packed", "weight_scale", "weight_shape")}
        hidden |= {f"{m}.weight_scale" for m in self.fp8}
        self.visible = (stored - hidden) | {f"{m}.weight" for m in self.packed}

    def __contains__(self, key: str) -> bool:
        return key in self.visible

    def keys(self) -> list[str]:
        return sorted(self.visible)

    def first_present(self, names: list[str]) -> str:
        for name in names:
            if name in self.visible:
                return name
        return super().first_present(names)

    def read(self, key: str) -> torch.Tensor:
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in self.packed:
            shape = [int(v) for v in super().read(f"{module}.weight_shape").tolist()]
            scale = super().read(f"{module}.weight_scale")
            q = unpack_int4(super().read(f"{module}.weight_packed"), shape[1])
            return dequantize_int4(q, scale, shape[1] // scale.shape[1])
        if module in self.fp8:
            scale = super().read(f"{module}.weight_scale").float()
            return fp8_dequantize(super().read(key), scale.reshape(-1, 1) if scale.numel() > 1 else scale)
        return super().read(key)


def load_compressed_tensors(folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                            device: torch.device | str = "cpu") -> nn.Module:
    """The transformers model of compressed-tensors folder `folder`, every weight dense in `dtype`
    on `device` (quantised linears dequantised as stored), in eval mode. ValueError for a folder
    that is not compressed-tensors or uses a format qforge does not read."""
    folder = Path(folder)
    q = _quantization_config(folder)
    if not is_compressed_tensors(folder):
        raise ValueError(f"'{folder}' is not a compressed-tensors folder (config.json quantization_config."
                         "quant_method is not 'compressed-tensors')")
    formats = {q.get("format")} | {g.get("format") for g in (q.get("config_groups") or {}).values()}
    unknown = sorted(str(f) for f in formats - {None, *FORMATS})
    if unknown:
        raise ValueError(f"'{folder}': compressed-tensors format {unknown[0]!r} is not supported; expected one of "
                         f"{', '.join(FORMATS)}")
    ckpt = DequantizedCheckpoint(folder)
    model = build_skeleton(read_config(folder), dtype)
    device = torch.device(device)
    _materialise(model, ckpt, dtype, device)
    _init_computed_buffers(model, device)
    return model.eval()
