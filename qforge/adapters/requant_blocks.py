"""Calibrated requantisation of a merged model, one decoder block at a time (GPTQ, AWQ).

    calibration rows --(embeddings, rotary: the model's own forward, stopped at block 0)--> X_0
    for block i:  block's adapted linears -> dense stand-ins holding the merged weights
                  run X_i through the block, hooks collecting each linear's inputs
                  quantise every linear of the block (GPTQ: Hessian; AWQ: scales, folds, RTN)
                  stand-ins take the dequantised weights; X_{i+1} = block(X_i)   (quantised prefix)
                  the block's own modules are put back

So each block is calibrated on what the already-quantised blocks before it produce, as GPTQ's
sequential procedure does, and the device holds one block's merged weights at a time. The model
passed in is left as it was (its modules and norm weights restored).

AWQ folds (Llama-style blocks; a fold needs an op whose output channels are the scaled inputs):
    input_layernorm.weight / s  ->  q_proj, k_proj, v_proj columns * s
    post_attention_layernorm.weight / s  ->  gate_proj, up_proj columns * s
    up_proj rows / s  ->  down_proj columns * s         (down's input is act(gate) * up)
    v_proj rows / s  ->  o_proj columns * s             (only without grouped KV heads: shapes)
A layer with no fold above (o_proj under grouped-query attention, any other linear) is plain RTN.
Norms of the form (1 + weight) (Gemma) are not folded into.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import AdaptedLinear
from ..quant.awq import awq_scales
from ..quant.gptq import HessianAccumulator, gptq_quantize
from ..quant.int4_groups import dequantize_int4, group_size_for, rtn_int4

AWQ_SAMPLES = 4096  # calibration tokens kept per linear for AWQ's scale search


@dataclass
class Int4Layer:
    """One quantised linear: q int8 [out, in], scale [out, in // group] (model dtype), group."""
    q: torch.Tensor
    scale: torch.Tensor
    group: int
    columns: torch.Tensor | None = None  # AWQ: the input scales s multiplied in ([in])
    rows: torch.Tensor | None = None     # AWQ: the output scales divided in by a fold ([out])

    def unscaled(self) -> torch.Tensor:
        """The float32 [out, in] weight this layer stands for in the unscaled model (AWQ's folds
        undone: what it should be compared with)."""
        w = dequantize_int4(self.q, self.scale, self.group)
        if self.columns is not None:
            w = w / self.columns[None, :]
        if self.rows is not None:
            w = w * self.rows[:, None]
        return w


@dataclass
class BlockResult:
    """A calibrated block: its quantised linears (by full module path) and the norm weights AWQ
    changed (full state-dict key -> float32 tensor)."""
    layers: dict[str, Int4Layer] = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    awq_alphas: dict[str, float] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by the block-0 hook: the rest of the forward is not needed."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the model's decoder blocks: the ModuleList holding the most adapted
    linear layers. ValueError when the model has none."""
    best, count = None, 0
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            n = sum(isinstance(m, AdaptedLinear) for m in module.modules())
            if n > count:
                best, count = (path, module), n
    if best is None:
        raise ValueError("calibrated requantisation (gptq, awq) needs a model whose decoder blocks hold adapted "
                         "linear layers; none found")
    return best


def block_inputs(model: nn.Module, block: nn.Module, rows: list[list[int]], device) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states [1, T, hidden], the block's keyword arguments) of block 0 for each row of
    token ids, from the model's own forward (embeddings, rotary tables, causal mask)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if "past_key" not in k}))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in rows:
            try:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """The block's outputs, each with its row's keyword arguments (the next block's inputs)."""
    out = []
    for hidden, kwargs in inputs:
        y = block(hidden, **kwargs)
        out.append(((y[0] if isinstance(y, tuple) else y).detach(), kwargs))
    return out


def _stand_in(layer: AdaptedLinear, weight: torch.Tensor) -> AdaptedLinear:
    """A dense AdaptedLinear with `weight` (float32 [out, in]) and layer's bias, compute dtype and
    input-dtype switch: the same forward as `layer` with its adapter merged."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)  # the stand-in's own copy
    dense = AdaptedLinear.dense(linear, layer.compute_dtype)
    dense.bias = layer.bias
    dense.keep_input_dtype = layer.keep_input_dtype
    return dense


class _Swapped:
    """Context: the block's adapted linears replaced by dense stand-ins holding merged weights
    (cast to the output dtype and back, so the weight quantised is the one the dense merge would
    write); the originals and any norm weight changed are restored on exit."""

    def __init__(self, block: nn.Module, merged: dict[str, torch.Tensor]):
        self.block, self.merged = block, merged
        self.originals: dict[str, AdaptedLinear] = {}
        self.norms: dict[str, torch.Tensor] = {}

    def __enter__(self) -> dict[str, AdaptedLinear]:
        stand_ins = {}
        for name, weight in self.merged.items():
            layer = self.block.get_submodule(name)
            self.originals[name] = layer
            stand_ins[name] = _stand_in(layer, weight)
            self.block.set_submodule(name, stand_ins[name])
        return stand_ins

    def scale_norm(self, name: str, s: torch.Tensor) -> torch.Tensor:
        """Divide norm `name`'s weight by s (kept to restore); its new float32 weight."""
        w = self.block.get_submodule(name).weight
        self.norms.setdefault(name, w.detach().clone())
        with torch.no_grad():
            w.copy_((w.float() / s.to(w.device)).to(w.dtype))
        return w.detach().float().cpu().clone()  # its own copy: the weight is restored on exit

    def __exit__(self, *exc) -> None:
        for name, layer in self.originals.items():
            self.block.set_submodule(name, layer)
        with torch.no_grad():
            for name, w in self.norms.items():
                self.block.get_submodule(name).weight.copy_(w)


def _collect_inputs(stand_ins: dict[str, AdaptedLinear], block: nn.Module, inputs, keep) -> dict:
    """Run the block once, calling keep(name, x [tokens, in] float32) for every stand-in's input."""
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: keep(n, args[0].reshape(-1, args[0].shape[-1]).float()))
               for n, m in stand_ins.items()]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()


def gptq_block(block: nn.Module, merged: dict[str, torch.Tensor], inputs, dtype: torch.dtype
               ) -> tuple[dict[str, Int4Layer], list]:
    """GPTQ every linear of `block` (merged: local name -> float32 weight) on `inputs`; the
    quantised layers (local names) and the block's outputs with the quantised weights."""
    with _Swapped(block, merged) as stand_ins:
        hessians = {n: HessianAccumulator(w.shape[1], w.device) for n, w in merged.items()}
        _collect_inputs(stand_ins, block, inputs, lambda n, x: hessians[n].add(x))
        layers = {}
        for n, w in merged.items():
            group = group_size_for(w.shape[1])
            q, scale = gptq_quantize(w, hessians[n].hessian, group, dtype)
            layers[n] = Int4Layer(q.cpu(), scale.cpu(), group)
            stand_ins[n].weight.data.copy_(dequantize_int4(q, scale, group).to(stand_ins[n].weight.dtype))
        return layers, run_block(block, inputs)


def awq_folds(block: nn.Module, merged: dict[str, torch.Tensor]) -> list[tuple[str, str, list[str]]]:
    """(kind "norm"|"linear", the op folded into, the linears scaled) for the folds this block allows."""
    have = set(merged)
    folds = []
    for norm, targets in (("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                          ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])):
        module = getattr(block, norm, None)
        foldable = module is not None and getattr(module, "bias", None) is None and \
            not type(module).__name__.startswith("Gemma")  # (1 + weight) norms: no fold
        if foldable and set(targets) <= have:
            folds.append(("norm", norm, targets))
    for prev, nxt in (("mlp.up_proj", "mlp.down_proj"), ("self_attn.v_proj", "self_attn.o_proj")):
        if {prev, nxt} <= have and merged[prev].shape[0] == merged[nxt].shape[1] and \
                block.get_submodule(prev).bias is None:
            folds.append(("linear", prev, [nxt]))
    return folds


def awq_block(block: nn.Module, merged: dict[str, torch.Tensor], inputs, dtype: torch.dtype, prefix: str
              ) -> tuple[BlockResult, list]:
    """AWQ on `block`: scales searched and folded (awq_folds), then RTN int4 of every linear.
    The result names layers by local name and norms by full state-dict key (prefix + local)."""
    result = BlockResult()
    merged = {n: w.clone() for n, w in merged.items()}
    swapped = _Swapped(block, merged)
    with swapped as stand_ins:
        samples: dict[str, list[torch.Tensor]] = {n: [] for n in merged}
        _collect_inputs(stand_ins, block, inputs, lambda n, x: samples[n].append(x))
        xs = {n: _subsample(torch.cat(v)) for n, v in samples.items()}
        columns: dict[str, torch.Tensor] = {}
        rows: dict[str, torch.Tensor] = {}
        for kind, op, targets in awq_folds(block, merged):
            groups = [group_size_for(merged[t].shape[1]) for t in targets]
            s, alpha, _, _ = awq_scales(xs[targets[0]], [merged[t] for t in targets], groups, dtype)
            result.awq_alphas[f"{prefix}{targets[0]}"] = alpha
            for t in targets:
                merged[t].mul_(s)
                columns[t] = s.cpu()
            if kind == "norm":
                result.norms[f"{prefix}{op}.weight"] = swapped.scale_norm(op, s)
            else:
                merged[op].div_(s[:, None])
                rows[op] = s.cpu()
        for n, w in merged.items():
            group = group_size_for(w.shape[1])
            q, scale = rtn_int4(w, group, dtype)
            result.layers[n] = Int4Layer(q.cpu(), scale.cpu(), group, columns.get(n), rows.get(n))
            stand_ins[n].weight.data.copy_(dequantize_int4(q, scale, group).to(stand_ins[n].weight.dtype))
        return result, run_block(block, inputs)


def _subsample(x: torch.Tensor, n: int = AWQ_SAMPLES) -> torch.Tensor:
    """At most n rows of x, evenly spaced (deterministic)."""
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]
