"""Merge an adapter into its base the QLoRA way: dequantise, merge in float32, write a dense model.

For every adapted layer (AdaptedLinear) the merged weight is
    W' = dequant(W) + s B A                                        (LoRA / rsLoRA)
    W' = m * (dequant(W) + s B A) / ||dequant(W) + s B A||_row      (DoRA)
computed in float32 and cast once to the output dtype. The adapter was trained against
dequant(W), not against the original full-precision weights, so this is the function it learned.

Merging into the 4-bit (or HQQ) codes in place is refused (`merge_in_place_4bit` says why). Requantising
the dense merge (`requantize="nf4"`, or "hqq4"/"hqq3"/"hqq2" for an HQQ folder) is offered for
deployment size, and is measured: the merged
weight is rounded to the grid again, and qforge_merge.json records how large that rounding error
is compared with the adapter's update.

A merged folder records what went into it (config.json `qforge_merged_adapters`, and
qforge_merge.json): merging the same adapter into it a second time is refused.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.checkpoint import build_bnb_config, hqq_config_for, quantization_config_for
from ..model.surgery import adapted_layers, quantized_layers
from ..nn import AdaptedLinear, LoraAdapter
from ..quant import dequantize, quantize
from ..quant.state import dtype_name
from .peft_format import layer_adapters, expert_adapters, write_folder_atomically


def compressed_state_dict(*args, **kwargs):
    """qforge.adapters.compressed_tensors.compressed_state_dict (imported when used: it imports this module)."""
    from .compressed_tensors import compressed_state_dict as build
    return build(*args, **kwargs)


COMPRESSED_TYPES = ("gptq", "awq", "fp8")

RECORD_KEY = "qforge_merged_adapters"  # in config.json, and on a model object that was merged
PROVENANCE_NAME = "qforge_merge.json"
SUPPORTED_COMMAND = "qforge merge --base SOURCE --adapter ADAPTER_DIR --out OUT_DIR"


class InPlaceMergeError(ValueError):
    """Merging an adapter into 4-bit weights in place: refused, with the reason and the alternative."""


# ---- the merged weights ---------------------------------------------------------------------
@torch.no_grad()
def merged_weight(layer: AdaptedLinear, adapter: LoraAdapter | None) -> torch.Tensor:
    """The float32 [out, in] weight equal to layer's forward with `adapter` (or the base alone)."""
    w = layer.dequantized(torch.float32)                                    # [out, in]
    return w if adapter is None else adapter.variant.merged_weight(w, adapter)


def merged_linears(model: nn.Module, name: str = "default") -> Iterator[tuple[str, AdaptedLinear, torch.Tensor]]:
    """(module path, layer, merged float32 weight) for every adapted layer, one at a time. A NaN or
    Inf in a merged weight is a ValueError naming the layer (as PEFT's safe_merge checks)."""
    # a ValueError listing the adapters present when `name` is absent
    layer_adapters(model, name, allow_none=bool(expert_adapters(model, name)))
    for module, layer in adapted_layers(model):
        w = merged_weight(layer, layer.adapters[name] if name in layer.adapters else None)
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"merging adapter '{name}' gives {bad} NaN/Inf values in layer '{module}' "
                             f"(shape {list(w.shape)}); the adapter is broken, nothing was written")
        yield module, layer, w


def merged_experts(model: nn.Module, name: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, merged float32 [E, out, in]) of every 4-bit MoE expert parameter, one at a
    time: transformers' fused `<experts>.gate_up_proj` / `.down_proj` with adapter `name` merged."""
    from ..model.surgery import expert_layers
    for module, experts in expert_layers(model):
        for p in experts.banks:
            w = experts.merged_weight(p, name)
            if not torch.isfinite(w).all():
                raise ValueError(f"merging adapter '{name}' gives NaN/Inf values in '{module}.{p}'; "
                                 "the adapter is broken, nothing was written")
            yield f"{module}.{p}", w


def other_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the adapted layers, floating ones cast to dtype. A
    tensor that shares memory with an earlier one (tied lm_head / embeddings) is written once, as
    save_pretrained does; transformers ties it again on load from config.tie_word_embeddings."""
    from ..model.surgery import expert_layers
    prefixes = tuple(f"{n}." for n, _ in [*adapted_layers(model), *expert_layers(model)])
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = (t.to(dtype) if t.is_floating_point() else t).detach().contiguous().cpu()
    return out


def merged_state_dict(model: nn.Module, name: str = "default", dtype: torch.dtype = torch.bfloat16
                      ) -> dict[str, torch.Tensor]:
    """A plain transformers state dict (`<module>.weight`, `<module>.bias`, ...) of the model with
    adapter `name` merged in float32 and cast once to `dtype`. Tied weights appear once. On the
    CPU, whatever the model's device: each layer is merged where the model is and then moved out,
    so the device holds one merged layer at a time."""
    out = other_tensors(model, dtype)
    for module, layer, w in merged_linears(model, name):
        out[f"{module}.weight"] = w.to(dtype).contiguous().cpu()
        if layer.bias is not None:
            out[f"{module}.bias"] = layer.bias.detach().to(dtype).contiguous().cpu()
    for key, w in merged_experts(model, name):
        out[key] = w.to(dtype).contiguous().cpu()
    return out


REQUANTIZE_TYPES = ("nf4", "fp4", "hqq4", "hqq3", "hqq2", "gptq", "awq", "fp8")  # the last three: compressed-tensors


def requantize_weight(layer: AdaptedLinear, w: torch.Tensor, quant_type: str, prefix: str,
                      group_size: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(state-dict tensors under `prefix`, dequantised float32 weight) of merged weight `w` [out, in]
    quantised to `quant_type`: nf4/fp4 with the layer's own blocksize and double quantisation
    (64 and on for a base that is not bitsandbytes 4-bit), bitsandbytes' keys at `prefix`.weight;
    hqq4/hqq3/hqq2 with `group_size` (default: the layer's own HQQ group size, else 64), the `hqq`
    package's keys at `prefix`. (prefix: the module path, no dot.)"""
    from ..nn.hqq_base import HQQBase
    from ..quant.hqq import hqq_nbits

    nbits = hqq_nbits(quant_type)
    if nbits is not None:
        own = getattr(layer.base, "hqq_state", None)
        base = HQQBase.from_weight(w, nbits, group_size or (own.group_size if own is not None else 64))
        tensors = {f"{prefix}.{k}": v for k, v in base.hqq_state.to("cpu").to_state_dict().items()}
        return tensors, base.dequantized(torch.float32)
    st = getattr(layer.base, "quant_state", None)
    q = quantize(w, quant_type, st.blocksize if st is not None else 64, st.nested if st is not None else True)
    return q.to("cpu").to_state_dict(f"{prefix}.weight"), dequantize(q, torch.float32)


def requantized_config(model: nn.Module, quant_type: str, dtype: torch.dtype, group_size: int | None = None) -> dict:
    """config.json's quantization_config of the merged model requantised to `quant_type`."""
    from ..quant.hqq import hqq_nbits

    nbits = hqq_nbits(quant_type)
    if nbits is not None:
        groups = {m.base.hqq_state.group_size for _, m in adapted_layers(model) if hasattr(m.base, "hqq_state")}
        return hqq_config_for(model, nbits, group_size or (groups.pop() if len(groups) == 1 else 64))
    if any(True for _ in quantized_layers(model)):
        return quantization_config_for(model, quant_type, dtype)
    adapted = {n.rsplit(".", 1)[-1] for n, _ in adapted_layers(model)}
    plain = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return build_bnb_config(quant_type, True, dtype, sorted(plain - adapted))


@torch.no_grad()
def requantized_state_dict(model: nn.Module, name: str = "default", dtype: torch.dtype = torch.bfloat16,
                           quant_type: str = "nf4", group_size: int | None = None
                           ) -> tuple[dict[str, torch.Tensor], float]:
    """The merged model with every merged linear weight quantised again (requantize_weight:
    bitsandbytes keys with the layer's own blocksize and double quantisation, or HQQ), and the
    rounding error over the update:
    ||dequant(Q') - W'||_F / ||W' - dequant(W)||_F summed over layers (> 1: the rounding is larger
    than what the adapter changed). Dequantise, merge and requantise run layer by layer on the
    model's device (quantisation through dispatch: Triton on CUDA, the same bits as on the CPU);
    the tensors returned are on the CPU."""
    from ..model.surgery import expert_layers
    if any(True for _ in expert_layers(model)):
        raise ValueError("requantising a merged model with 4-bit MoE experts is not supported: bitsandbytes' "
                         "format has no 4-bit fused expert parameters; write the dense merged model instead")
    out = other_tensors(model, dtype)
    err2 = upd2 = 0.0
    for module, layer, w in merged_linears(model, name):
        tensors, back = requantize_weight(layer, w.to(dtype), quant_type, module, group_size)
        out.update(tensors)
        if layer.bias is not None:
            out[f"{module}.bias"] = layer.bias.detach().to(dtype).contiguous().cpu()
        err2 += float((back - w).pow(2).sum())
        upd2 += float((w - layer.dequantized(torch.float32)).pow(2).sum())
    return out, (err2 ** 0.5) / max(upd2 ** 0.5, 1e-30)


# ---- merge records: refuse merging the same adapter twice -----------------------------------
@torch.no_grad()
def adapter_fingerprint(model: nn.Module, name: str = "default") -> str:
    """sha256 of adapter `name`'s weights (float32 bytes, layers in order): the same adapter gives
    the same fingerprint wherever it was loaded from."""
    h = hashlib.sha256()
    for module, a in layer_adapters(model, name, allow_none=bool(expert_adapters(model, name))).items():
        h.update(module.encode())
        for t in a.peft_weights().values():  # A, B, then the variant's own (DoRA's magnitude)
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for module, loras in expert_adapters(model, name).items():  # LoRA on MoE experts
        for p, lora in loras.items():
            h.update(f"{module}.{p}".encode())
            for t in (lora.lora_A, lora.lora_B):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def merge_records(model: nn.Module) -> list[dict]:
    """Merges recorded on the model object or its config (a base loaded from a merged folder)."""
    records = list(getattr(model, RECORD_KEY, None) or [])
    config = getattr(model, "config", None)
    return records + list(getattr(config, RECORD_KEY, None) or [])


def check_not_merged(model: nn.Module, record: dict) -> None:
    """ValueError when `record`'s adapter (same weights, or same source folder) is already merged."""
    for old in merge_records(model):
        same_source = record.get("source") and old.get("source") == record["source"]
        if old.get("sha256") == record["sha256"] or same_source:
            raise ValueError(
                f"adapter '{record['adapter']}' ({record.get('source') or 'in memory'}) is already merged into this "
                f"base (merge record {old}); merging it again would add its update twice. Merge into the "
                "original base instead.")


# ---- writing a folder -----------------------------------------------------------------------
def _config_dict(model: nn.Module, dtype: torch.dtype, records: list[dict], quant_config: dict | None) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("save_merged needs a transformers model (one with a .config)")
    cfg = config.to_diff_dict() if hasattr(config, "to_diff_dict") else config.to_dict()  # as save_pretrained
    cfg.pop("quantization_config", None)
    cfg["dtype"] = cfg["torch_dtype"] = dtype_name(dtype)  # transformers 5 reads dtype, 4.x torch_dtype
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out_emb, AdaptedLinear) and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False  # the output layer was merged on its own: keep it untied
    cfg[RECORD_KEY] = records
    if quant_config is not None:
        cfg["quantization_config"] = quant_config
    return cfg


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path, name: str = "default",
                dtype: torch.dtype = torch.bfloat16, requantize: str | None = None,
                adapter_source: str | Path | None = None, group_size: int | None = None,
                calibration: list[list[int]] | None = None, progress: bool = False) -> Path:
    """Write `model` with adapter `name` merged as a plain transformers folder (config.json without
    quantization_config, model.safetensors in `dtype`, tokenizer files when `tokenizer` is given,
    qforge_merge.json), or with requantize="nf4"/"fp4" as a bitsandbytes 4-bit folder, "hqq4"/"hqq3"/
    "hqq2" as an HQQ folder (group_size: default the base's HQQ group size, else 64), "gptq"/"awq"/
    "fp8" as a compressed-tensors folder (qforge.adapters.compressed_tensors; gptq/awq calibrate on
    `calibration`, rows of token ids; `progress`: a bar over blocks). Atomic.
    Refused (ValueError) when this adapter is already merged into the model's base."""
    if requantize not in (None, *REQUANTIZE_TYPES):
        raise ValueError(f"requantize must be None or one of {', '.join(REQUANTIZE_TYPES)}, got {requantize!r}")
    source = str(Path(adapter_source).absolute()) if adapter_source is not None else None
    record = {"adapter": name, "source": source, "sha256": adapter_fingerprint(model, name)}
    check_not_merged(model, record)
    rounding, extra = None, {}
    if requantize is None:
        tensors, quant_config = merged_state_dict(model, name, dtype), None
    elif requantize in COMPRESSED_TYPES:
        tensors, quant_config, extra = compressed_state_dict(model, name, dtype, requantize, calibration, progress)
        rounding = extra.pop("requantize_error_over_update")
    else:
        tensors, rounding = requantized_state_dict(model, name, dtype, requantize, group_size)
        quant_config = requantized_config(model, requantize, dtype, group_size)
    records = merge_records(model) + [record]
    config = _config_dict(model, dtype, records, quant_config)
    provenance = {"adapter": name, "adapter_source": source, "adapter_sha256": record["sha256"],
                  "base_model": getattr(model, "name_or_path", None) or None, "dtype": dtype_name(dtype),
                  "requantize": requantize, "requantize_error_over_update": rounding,
                  RECORD_KEY: records, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}

    def write(tmp: Path) -> None:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        from ..model.checkpoint import save_tokenizer  # the template's end of turn as an end token
        save_tokenizer(tokenizer, tmp, getattr(model, "generation_config", None))
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_folder_atomically(out_dir, write, markers=("config.json", PROVENANCE_NAME))


# ---- the refused merge ----------------------------------------------------------------------
@torch.no_grad()
def _rounding_demo(model: nn.Module, name: str) -> str:
    """One layer's numbers: how much of the update survives requantising dequant(W) + update."""
    layers = layer_adapters(model, name, allow_none=bool(expert_adapters(model, name)))
    if not layers:  # an adapter on MoE experts only
        return ""
    module, adapter = next(iter(layers.items()))
    layer = model.get_submodule(module)
    w0 = layer.dequantized(torch.float32)
    w1 = merged_weight(layer, adapter)
    hqq = getattr(layer.base, "hqq_state", None)
    if hqq is not None:  # the same HQQ setting again: compare codes
        tensors, back = requantize_weight(layer, w1, layer.base.kind, module)
        same = float((tensors[f"{module}.W_q"] == hqq.packed.cpu()).float().mean()) * 100
    else:
        st = layer.base.quant_state
        q = quantize(w1, st.quant_type, st.blocksize, st.nested)
        same, back = float((q.packed == st.packed).float().mean()) * 100, dequantize(q, torch.float32)
    kept = float(torch.linalg.matrix_norm(back - w0)) / \
        max(float(torch.linalg.matrix_norm(w1 - w0)), 1e-30)
    return (f" Measured on layer '{module}': {same:.1f}% of the packed code bytes would not change, and the "
            f"requantised change has {kept:.2f}x the norm of the adapter's update, in the wrong places.")


def merge_in_place_4bit(model: nn.Module | None = None, name: str = "default") -> None:
    """Always raises InPlaceMergeError: folding s B A into the 4-bit codes of a QLoRA base (NF4/FP4,
    or HQQ at 4, 3 or 2 bits: the same argument, with a coarser grid at 3 and 2 bits).

    dequant(W) sits exactly on the quantisation grid, and a LoRA update is far smaller than one
    NF4 step (absmax * ~0.1 between neighbouring levels), so requantising dequant(W) + s B A rounds
    almost every weight back to its old code: the adapter's effect is lost, and where a weight does
    move it moves by a whole step. With a model, the message carries one layer's measured numbers.
    """
    demo = _rounding_demo(model, name) if model is not None else ""
    raise InPlaceMergeError(
        f"merging adapter '{name}' in place into 4-bit (or HQQ) weights is refused: it would requantise "
        "dequant(W) + s*B@A, and since dequant(W) already sits on the quantisation grid while the update is far "
        "smaller than the NF4 step size (or an HQQ group's step, coarser still at 3 and 2 bits), nearly every weight "
        "rounds back to its old code and the adapter's effect is lost."
        f"{demo} Supported: dequantise, merge in float32 and write a dense model with `{SUPPORTED_COMMAND}` "
        "(bfloat16 by default, or --dtype float32); add `--requantize nf4` (or hqq4, hqq3, hqq2) only if you need "
        "a quantised folder "
        "again, and evaluate it: requantising rounds the merged weights once more.")
