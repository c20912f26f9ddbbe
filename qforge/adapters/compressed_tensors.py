"""The merged model requantised for serving engines, in the `compressed-tensors` format that vLLM
and SGLang load (and transformers, with the compressed-tensors package installed).

    --requantize gptq | awq   W4A16: symmetric int4, groups of 128 along the input (64 or 32 where
                              128 does not divide the row, one scale per row where nothing does),
                              format "pack-quantized": <module>.weight_packed int32 [out, in / 8],
                              .weight_scale [out, in / group] (model dtype), .weight_shape int64 [2]
    --requantize fp8          E4M3 weights, one float32 scale per output channel, weight-only,
                              format "float-quantized": <module>.weight float8_e4m3fn [out, in],
                              .weight_scale float32 [out, 1]

Quantised are the adapted linear layers inside the decoder blocks; everything else (embeddings,
norms, lm_head) is written dense in the merge dtype and lm_head is listed in `ignore`. GPTQ and
AWQ calibrate block by block on token rows (qforge.adapters.requant_blocks); FP8 needs no data.
The format is written by our own code from the format's description (config.json's
`quantization_config`); the compressed-tensors package is a test oracle only.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from ..model.load import progress_bar
from ..model.surgery import adapted_layers
from ..nn import AdaptedLinear
from ..quant.fp8 import fp8_dequantize, fp8_quantize
from ..quant.int4_groups import pack_int4
from . import requant_blocks as rb

COMPRESSED_TYPES = ("gptq", "awq", "fp8")
FORMATS = {"gptq": "pack-quantized", "awq": "pack-quantized", "fp8": "float-quantized"}


# ---- tensors ----------------------------------------------------------------------------------
def int4_tensors(module: str, layer: rb.Int4Layer) -> dict[str, torch.Tensor]:
    """pack-quantized tensors of one linear (module: its path, no dot)."""
    return {f"{module}.weight_packed": pack_int4(layer.q), f"{module}.weight_scale": layer.scale.contiguous(),
            f"{module}.weight_shape": torch.tensor(list(layer.q.shape), dtype=torch.int64)}


def fp8_tensors(module: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """float-quantized tensors of one linear."""
    return {f"{module}.weight": q.contiguous(), f"{module}.weight_scale": scale.contiguous()}


def _adapter_of(layer: AdaptedLinear, name: str):
    return layer.adapters[name] if name in layer.adapters else None


def _merged(module: str, layer: AdaptedLinear, name: str, dtype: torch.dtype) -> torch.Tensor:
    """The merged weight as the dense merge writes it (rounded to dtype), float32 [out, in]."""
    from .merge import merged_weight
    w = merged_weight(layer, _adapter_of(layer, name))
    if not torch.isfinite(w).all():
        raise ValueError(f"merging adapter '{name}' gives NaN/Inf values in layer '{module}'; the adapter is "
                         "broken, nothing was written")
    return w.to(dtype).float()


class _Error:
    """Sums for the requantisation error over the adapter's update (as qforge_merge.json reports)."""

    def __init__(self):
        self.err2 = self.upd2 = 0.0

    def add(self, layer: AdaptedLinear, merged: torch.Tensor, back: torch.Tensor) -> None:
        merged = merged.cpu()
        self.err2 += float((back.cpu() - merged).pow(2).sum())
        self.upd2 += float((merged - layer.dequantized(torch.float32).cpu()).pow(2).sum())

    def ratio(self) -> float:
        return self.err2 ** 0.5 / max(self.upd2 ** 0.5, 1e-30)


# ---- the state dict ---------------------------------------------------------------------------
@torch.no_grad()
def compressed_state_dict(model: nn.Module, name: str = "default", dtype: torch.dtype = torch.bfloat16,
                          scheme: str = "gptq", calibration: list[list[int]] | None = None,
                          progress: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors on the CPU, config.json's quantization_config, a report) of `model` with adapter
    `name` merged and its decoder-block linears requantised by `scheme` (gptq, awq, fp8).
    `calibration`: token-id rows for gptq/awq (ValueError without). The merged BF16 weights of one
    block at a time exist; what accumulates is the compressed output (4-bit, or FP8)."""
    from .merge import other_tensors
    from ..model.surgery import expert_layers
    if scheme not in COMPRESSED_TYPES:
        raise ValueError(f"scheme must be one of {', '.join(COMPRESSED_TYPES)}, got {scheme!r}")
    if any(True for _ in expert_layers(model)):
        raise ValueError(f"--requantize {scheme} of a model with 4-bit MoE experts is not supported; write the "
                         "dense merged model instead")
    if scheme != "fp8" and not calibration:
        raise ValueError(f"--requantize {scheme} needs calibration rows (--calibration FILE)")
    path, blocks = rb.decoder_blocks(model)
    out = other_tensors(model, dtype)
    report: dict = {"scheme": scheme, "calibration_rows": len(calibration or [])}
    error = _Error()
    quantised: dict[str, int | None] = {}  # module path -> group size (None: FP8 per channel)
    if scheme == "fp8":
        for module, layer in progress_bar(list(_block_layers(model, path)), progress, f"requantize {scheme}"):
            w = _merged(module, layer, name, dtype)
            q, scale = fp8_quantize(w)
            out.update(fp8_tensors(module, q.cpu(), scale.cpu()))
            error.add(layer, w, fp8_dequantize(q, scale))
            quantised[module] = None
    else:
        norms = _calibrated_blocks(model, name, dtype, scheme, calibration, path, blocks, out, error, quantised,
                                   report, progress)
        out.update({k: v.to(dtype) for k, v in norms.items()})
    for module, layer in adapted_layers(model):  # adapted layers outside the blocks: dense, merged
        if module not in quantised:
            out[f"{module}.weight"] = _merged(module, layer, name, dtype).to(dtype).cpu()
    for module, layer in adapted_layers(model):
        if layer.bias is not None:
            out[f"{module}.bias"] = layer.bias.detach().to(dtype).contiguous().cpu()
    report["requantize_error_over_update"] = error.ratio()
    return out, quantization_config(model, scheme, quantised), report


def _block_layers(model: nn.Module, path: str):
    """(module path, layer) of the adapted linears inside the decoder blocks at `path`."""
    return [(m, layer) for m, layer in adapted_layers(model) if m.startswith(f"{path}.")]


def _calibrated_blocks(model, name, dtype, scheme, calibration, path, blocks, out, error, quantised, report,
                       progress) -> dict[str, torch.Tensor]:
    """GPTQ or AWQ block by block (requant_blocks); fills `out`, `error`, `quantised`, the report's
    AWQ alphas; returns the norm weights AWQ changed (state-dict key -> float32)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    norms: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    try:
        inputs = rb.block_inputs(model, blocks[0], calibration, device)
        for i in progress_bar(list(range(len(blocks))), progress, f"requantize {scheme}"):
            block, prefix = blocks[i], f"{path}.{i}."
            layers = {m[len(prefix):]: layer for m, layer in adapted_layers(model) if m.startswith(prefix)}
            merged = {local: _merged(prefix + local, layer, name, dtype) for local, layer in layers.items()}
            if scheme == "gptq":
                result, inputs = rb.gptq_block(block, merged, inputs, dtype)
            else:
                awq, inputs = rb.awq_block(block, merged, inputs, dtype, prefix)
                result = awq.layers
                norms.update(awq.norms)
                alphas.update(awq.awq_alphas)
            for local, qlayer in result.items():
                out.update(int4_tensors(prefix + local, qlayer))
                error.add(layers[local], merged[local].cpu(), qlayer.unscaled())  # AWQ's folds undone
                quantised[prefix + local] = qlayer.group
    finally:
        model.train(was_training)
    if alphas:
        report["awq_alphas"] = alphas
    return norms


# ---- config.json ------------------------------------------------------------------------------
def _weights_args(scheme: str, group: int | None, in_features: int) -> dict:
    """compressed-tensors' QuantizationArgs (as JSON) of one config group."""
    if scheme == "fp8":
        return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
                "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    per_row = group == in_features
    return {"num_bits": 4, "type": "int", "symmetric": True, "group_size": None if per_row else group,
            "strategy": "channel" if per_row else "group", "dynamic": False, "actorder": None,
            "observer": "minmax", "observer_kwargs": {}}


def quantization_config(model: nn.Module, scheme: str, quantised: dict[str, int | None]) -> dict:
    """config.json's quantization_config: one config group per (group size) with targets naming
    the layers by their path within a block (`re:.*self_attn\\.q_proj$`), or by full path where
    layers with the same local name differ in group size; the other linears are `ignore`d."""
    fmt = FORMATS[scheme]
    in_features = {m: model.get_submodule(m).in_features for m in quantised}
    local = {m: re.sub(r"^.*?\.\d+\.", "", m) for m in quantised}
    keys_of_local = defaultdict(set)
    for m, g in quantised.items():
        keys_of_local[local[m]].add((g, g == in_features[m]))
    groups: dict[tuple, list[str]] = defaultdict(list)
    for m, g in sorted(quantised.items()):
        key = (g, g == in_features[m])
        target = f"re:.*{re.escape(local[m])}$" if len(keys_of_local[local[m]]) == 1 else f"re:^{re.escape(m)}$"
        if target not in groups[key]:
            groups[key].append(target)
    config_groups = {}
    for i, ((g, _), targets) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        example = next(m for m in quantised if (quantised[m], quantised[m] == in_features[m]) == (g, _))
        config_groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(scheme, g, in_features[example]),
                                       "input_activations": None, "output_activations": None, "format": fmt}
    adapted = tuple(f"{n}." for n, _ in adapted_layers(model))  # their lora_A/lora_B are no model layers
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear))
                    and n not in quantised and not n.startswith(adapted))
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}
