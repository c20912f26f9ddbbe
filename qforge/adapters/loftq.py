"""LoftQ: choose the 4-bit base Q and the adapter's starting (A, B) together, so that at step 0
dequant(Q) + s * B @ A is closer to the full-precision W than plain dequant(quantise(W)) is.

    res = W
    repeat T times:
        Q = quantise(res)                 # NF4 / FP4, blockwise, as the base will be stored
        E = W - dequant(Q)                # what the 4-bit base misses
        U, S, Vh = svd(E)                 # rank-r part of it becomes the adapter
        B = U[:, :r] sqrt(S[:r]);  A = sqrt(S[:r]) Vh[:r]
        res = W - B @ A                   # (skipped on the last iteration)

The adapter multiplies B @ A by its scaling s, so A and B are each divided by sqrt(s): then
s * B @ A is exactly the rank-r SVD part, and A and B keep equal norms, as the unscaled split has.

LoftQ needs the full-precision weight, which a 4-bit layer no longer has: it runs where the dense
weight still exists, per layer (`loftq_linear`) or over a model whose targets are still nn.Linear
(`quantize_linears_loftq`, used in place of surgery.quantize_linears when spec.loftq_iters > 0).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..model.surgery import linear_names, select_targets, set_active_adapter, set_module
from ..nn import AdaptedLinear, LoraSpec, Quant4bitBase
from ..quant import QuantState, dequantize, quantize


def loftq_init(weight: torch.Tensor, r: int, iters: int, quant_type: str = "nf4", blocksize: int = 64,
               double_quant: bool = True, scaling: float = 1.0) -> tuple[QuantState, torch.Tensor, torch.Tensor]:
    """LoftQ for one weight W [out, in] (any float dtype; the maths runs in float32).

    Returns (Q, A, B): Q the 4-bit base (its dtype records W's dtype), A float32 [r, in] and
    B float32 [out, r] with dequant(Q) + scaling * B @ A ~= W. `iters` >= 1; iteration 1 alone is
    "quantise, then fit the residual"; more iterations let the quantiser see W - B @ A.
    """
    if weight.dim() != 2:
        raise ValueError(f"loftq_init: expected a 2-D weight [out, in], got shape {list(weight.shape)}")
    if iters < 1:
        raise ValueError(f"loftq_init: iters must be >= 1, got {iters}")
    if not 1 <= r <= min(weight.shape):
        raise ValueError(f"loftq_init: rank {r} must be in [1, {min(weight.shape)}] for shape {list(weight.shape)}")
    if scaling <= 0:
        raise ValueError(f"loftq_init: scaling must be > 0, got {scaling}")
    w = weight.detach().float()
    res = w
    for it in range(iters):
        state = quantize(res, quant_type, blocksize, double_quant)
        err = w - dequantize(state, torch.float32)                           # [out, in]
        U, S, Vh = torch.linalg.svd(err, full_matrices=False)
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]                      # [out, r], [r, in]
        if it < iters - 1:
            res = w - B @ A
    root_s = math.sqrt(scaling)
    return replace(state, dtype=weight.dtype), (A / root_s).contiguous(), (B / root_s).contiguous()


def loftq_linear(linear: nn.Linear, spec: LoraSpec, name: str = "default", quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype = torch.bfloat16) -> AdaptedLinear:
    """An AdaptedLinear whose 4-bit base and adapter `name` are LoftQ-initialised from linear's dense
    weight, with spec.loftq_iters iterations (at least 1). With DoRA the magnitude starts as the
    row norms of dequant(Q) + s B A, so the layer starts at the LoftQ approximation too."""
    iters = max(spec.loftq_iters, 1)
    state, A, B = loftq_init(linear.weight, spec.r, iters, quant_type, blocksize, double_quant, spec.scaling)
    layer = AdaptedLinear(Quant4bitBase(state.to(linear.weight.device)), linear.bias, compute_dtype)
    adapter = layer.add_adapter(name, spec)
    with torch.no_grad():
        adapter.lora_A.weight.copy_(A)
        adapter.lora_B.weight.copy_(B)
        adapter.variant.init(layer, adapter)  # DoRA: m from dequant(Q) + s B A, the LoftQ start
    return layer


def quantize_linears_loftq(model: nn.Module, spec: LoraSpec, name: str = "default",
                           quantize_targets: list[str] | None = None, quant_type: str = "nf4", blocksize: int = 64,
                           double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Quantise a model's nn.Linear layers and give the ones spec targets a LoftQ-initialised adapter
    `name` (made active); the others are quantised plainly. `quantize_targets`: the layers to make
    4-bit (default: every linear but spec.modules_to_skip). Layers are replaced one at a time, so
    one dense weight at a time is in flight. Returns the names of the LoftQ layers."""
    names = linear_names(model)
    quantized = quantize_targets if quantize_targets is not None else select_targets(names, "all-linear",
                                                                                   spec.modules_to_skip)
    adapted = set(select_targets(names, spec.target_modules, spec.modules_to_skip))
    missing = sorted(adapted - set(quantized))
    if missing:
        raise ValueError(f"LoftQ targets {missing[:5]} are not among the layers to quantise")
    for layer_name in quantized:
        linear = model.get_submodule(layer_name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"layer '{layer_name}' is a {type(linear).__name__}; LoftQ needs the dense nn.Linear")
        if layer_name in adapted:
            new = loftq_linear(linear, spec, name, quant_type, blocksize, double_quant, compute_dtype)
        else:
            new = AdaptedLinear.quantized(linear, quant_type, blocksize, double_quant, compute_dtype)
        set_module(model, layer_name, new)
    set_active_adapter(model, name)
    return [n for n in quantized if n in adapted]


def loftq_error(weight: torch.Tensor, state: QuantState, A: torch.Tensor | None = None,
                B: torch.Tensor | None = None, scaling: float = 1.0) -> float:
    """||W - (dequant(Q) + s B A)||_F in float32 (without A, B: the plain quantisation error)."""
    approx = dequantize(state, torch.float32)
    if A is not None:
        approx = approx + scaling * (B.float() @ A.float())
    return float(torch.linalg.matrix_norm(weight.float() - approx))


def load_loftq_model(source, spec: LoraSpec, name: str = "default", quant_type: str = "nf4", blocksize: int = 64,
                     double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                     target_modules="all-linear", revision: str | None = None):
    """(model, tokenizer): `source` loaded dense in float32 (LoftQ needs each dense weight next to
    its quantisation), its target linears quantised one at a time with LoftQ-initialised adapters
    `name` (the others plainly), then every other float tensor cast to `compute_dtype`. Holds the
    float32 model once, layer weights freed as they are replaced. Built on the CPU."""
    from ..model.load import load_model

    if quant_type.startswith("hqq"):
        raise ValueError(f"LoftQ initialises adapters against an nf4/fp4 base, not quant type '{quant_type}'; "
                         "set loftq_iters 0 for an HQQ base")
    model, tokenizer = load_model(source, compute_dtype=torch.float32, quantize=False, revision=revision)
    targets = select_targets(linear_names(model), target_modules)
    quantize_linears_loftq(model, spec, name, quantize_targets=targets, quant_type=quant_type, blocksize=blocksize,
                           double_quant=double_quant, compute_dtype=compute_dtype)
    for pname, param in model.named_parameters():  # tied parameters are one object: cast once
        if param.is_floating_point() and ".adapters." not in pname:
            param.data = param.data.to(compute_dtype)
    return model, tokenizer
