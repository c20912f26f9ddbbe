"""Half-Quadratic Quantisation (HQQ): calibration-free 4, 3 and 2-bit weights with a scale and a
zero-point per group, the zero-point refined by a proximal solver. Pure tensor math; the `hqq`
package (PyPI, mobiusml) is the oracle and its layout is our file format.

The math
--------
A weight W (any shape, numel divisible by `group_size`) is cut into groups of `group_size` values:
axis=1 (the `hqq` package's default, `BaseQuantizeConfig(axis=1)`) takes consecutive values of the
flattened weight, i.e. W.reshape(-1, g) and one (scale, zero) per row; axis=0 takes W.reshape(g, -1)
and one (scale, zero) per column. With m = 2**nbits - 1:

    s = m / (max - min)        (1.0 where max - min <= 1e-4; at most 2e4)    an *inverse* scale
    z = -min * s               rounded when nbits == 4 (the package's `round_zero` default)
    q = clamp(round(W * s + z), 0, m)
    W ~ (q - z) / s

The solver keeps s and moves z to minimise the l_p error (p = 0.7 < 1: sparse, heavy-tailed errors
are forgiven) by half-quadratic splitting: with W_r = (q - z) / s the current reconstruction,

    W_e = shrink_p(W - W_r, beta)  = sign(x) * relu(|x| - |x|**(p-1) / beta),  x = W - W_r
    z   = mean over the group of (q - (W - W_e) * s)

for at most `iters` (20) rounds, stopping at the first round whose mean |W - W_r| does not improve
(`early_stop`). The `hqq` package's default solver (`optimize_weights_proximal`, its "legacy" one)
reads kappa (1.01) but never grows beta; qforge does the same unless `anneal_beta=True`, which
multiplies beta by kappa each round (the package's slower "v2" solver). Stored is the *forward*
scale 1/s, so dequantisation is (q - z) * scale, one fused multiply-add per value.

Optional quantisation of the scales and zeros (`quant_scale`, `quant_zero`) follows the package's
`BaseQuantizeConfig(quant_scale=True, quant_zero=True)`: scales 8-bit, groups of 128 along axis 0,
no solver; zeros 8-bit with one min/max for the whole tensor.

The folder format (the `hqq` package's own, as `HQQLinear.state_dict()` with safetensors encoding
writes it, and as transformers' HQQ integration saves it)
-------------------------------------------------------------------------------------------------
For a quantised linear layer at module path P, a model.safetensors holds:

    P.W_q                 packed codes, grouped then packed along dim 0 of the grouped tensor:
                            4-bit: uint8 [G/2, C]   rows r and r + G/2 share a byte (high, low nibble)
                            3-bit: int32 [ceil(G/10), C]  ten rows per int32 (bits 27..0, 3 each),
                                   zero rows pad G to a multiple of 10
                            2-bit: uint8 [G/4, C]   four rows per byte (bits 7..6 first)
                          where [G, C] = [numel/g, g] (axis 1) or [g, numel/g] (axis 0)
    P.scale, P.zero       float [G, 1] (axis 1) or [1, C] (axis 0): dequant scale and zero-point
    P.nbits, P.group_size, P.axis                 int32 scalars
    P.shape                                       int64 [2], the weight's shape
    P.packing, P.unpack_view_dtype, P.compute_dtype  uint8 ASCII strings ("4bit_u8", "torch.uint8", ...)
    P.view_as_float, P.quant_scale, P.quant_zero, P.offload_meta, P.encoded_state_dict,
    P.stores_quant_config, P.channel_wise, P.optimize, P.round_zero   uint8 0/1 scalars
    P.bias                                        optional, the layer's bias

and config.json carries `quantization_config` = {"quant_method": "hqq", "quant_config": the
package's BaseQuantizeConfig dict, "skip_modules": [...]} (`hqq_quantization_config`).
The package refuses to serialise quantised scales/zeros; qforge writes them as its own extension:
P.scale_q, P.zero_q (uint8 codes) and P.meta_scale.{scale,zero,...}, P.meta_zero.{scale,zero,...}
(the 8-bit states' own keys), with P.quant_scale / P.quant_zero set to 1 and no P.scale / P.zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HQQ_BITS = (4, 3, 2, 8)
_PACKING = {8: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8"}
_VIEW_DTYPE = {"8bit_u8": torch.uint8, "4bit_u8": torch.uint8, "3bit_32": torch.int32, "2bit_u8": torch.uint8}
_PER_WORD = {"8bit_u8": 1, "4bit_u8": 2, "3bit_32": 10, "2bit_u8": 4}
_DTYPES = {str(t): t for t in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int32)}


@dataclass(frozen=True)
class HQQSolver:
    """The proximal solver's settings: the `hqq` package's `optimize_weights_proximal` defaults."""
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    anneal_beta: bool = False    # multiply beta by kappa every round (the package's default does not)


@dataclass
class HQQState:
    """An HQQ-quantised tensor.

    packed: codes in the `hqq` layout (uint8 or int32, see the module docstring);
    scale, zero: dequant scale and zero-point, [G, 1] (axis 1) or [1, C] (axis 0), float;
                 None when held quantised in `scale_q` / `zero_q` (8-bit HQQStates of their own).
    """

    packed: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    shape: torch.Size
    nbits: int
    group_size: int
    axis: int = 1
    round_zero: bool = False
    optimize: bool = True
    channel_wise: bool = True
    scale_q: "HQQState | None" = None
    zero_q: "HQQState | None" = None

    @property
    def packing(self) -> str:
        return _PACKING[self.nbits]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def grouped_shape(self) -> tuple[int, int]:
        """[G, C] of the grouped codes before packing."""
        if not self.channel_wise:
            return tuple(self.shape) if len(self.shape) == 2 else (self.numel, 1)
        g = self.group_size
        return (self.numel // g, g) if self.axis == 1 else (g, self.numel // g)

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, uint8 [G, C]."""
        return unpack_codes(self.packed, self.nbits, self.grouped_shape[0])

    def meta_tensors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) in `dtype`, dequantising them first when they are held quantised."""
        scale = self.scale_q.dequantize(torch.float32) if self.scale_q is not None else self.scale
        zero = self.zero_q.dequantize(torch.float32) if self.zero_q is not None else self.zero
        return scale.to(dtype), zero.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return hqq_dequantize(self, dtype)

    def nbytes(self) -> int:
        """Bytes held: packed codes plus scales and zeros (or their 8-bit states)."""
        total = self.packed.numel() * self.packed.element_size()
        for t, q in ((self.scale, self.scale_q), (self.zero, self.zero_q)):
            total += q.nbytes() if q is not None else t.numel() * t.element_size()
        return total

    def to(self, device) -> "HQQState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return HQQState(move(self.packed), move(self.scale), move(self.zero), self.shape, self.nbits,
                        self.group_size, self.axis, self.round_zero, self.optimize, self.channel_wise,
                        move(self.scale_q), move(self.zero_q))

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return hqq_state_dict(self, prefix)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "") -> "HQQState":
        return hqq_from_state_dict(state_dict, prefix)


# ---------------------------------------------------------------------------------------------
# Packing: slices of rows of the grouped codes share a word.

def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes [G, C] (values < 2**nbits) -> the `hqq` packed tensor (see the module docstring)."""
    packing = _PACKING[nbits]
    per_word, word = _PER_WORD[packing], _VIEW_DTYPE[packing]
    rows = codes.shape[0]
    padded_rows = -(-rows // per_word) * per_word
    codes = codes.to(word)
    if padded_rows != rows:
        codes = torch.cat([codes, codes.new_zeros(padded_rows - rows, codes.shape[1])])
    step = padded_rows // per_word
    out = torch.zeros(step, codes.shape[1], dtype=word, device=codes.device)
    for i in range(per_word):   # slice i goes to the bits (per_word - 1 - i) * width
        out |= codes[i * step:(i + 1) * step] << ((per_word - 1 - i) * nbits)
    return out


def unpack_codes(packed: torch.Tensor, nbits: int, rows: int) -> torch.Tensor:
    """The inverse of `pack_codes`: uint8 codes [rows, C]."""
    packing = _PACKING[nbits]
    per_word, mask = _PER_WORD[packing], (1 << nbits) - 1
    if per_word == 1:
        return packed.to(torch.uint8)[:rows]
    slices = [(packed >> ((per_word - 1 - i) * nbits)) & mask for i in range(per_word)]
    return torch.cat(slices)[:rows].to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Quantisation

def solve_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, axis: int,
               solver: HQQSolver = HQQSolver()) -> torch.Tensor:
    """Refine the zero-points of grouped float32 `w` for fixed inverse `scale` (the proximal solver).

    Returns the zero after the last round run; like the package, a round whose error did not
    improve still leaves its update in place. Each round works in two temporaries the size of w,
    updated in place (the same operations in the same order as the package's: the same bits)."""
    beta, best = solver.beta, math.inf
    for _ in range(solver.iters):
        q = w * scale
        q.add_(zero).round_().clamp_(0, qmax)           # codes
        x = q - zero
        x.div_(scale)                                   # W_r = (q - z) / s
        torch.sub(w, x, out=x)                          # x = W - W_r
        mag = x.abs()
        error = mag.mean().item()
        if solver.lp_norm == 1:
            mag.sub_(1.0 / beta)
        else:
            mag.sub_(mag.pow(solver.lp_norm - 1).mul_(1.0 / beta))
        mag.clamp_min_(0.0).mul_(torch.sign(x))         # W_e = shrink_p(x, beta)
        torch.sub(w, mag, out=mag)                      # W - W_e
        q.sub_(mag.mul_(scale))
        zero = torch.mean(q, axis, keepdim=True)        # z = mean(q - (W - W_e) s)
        if solver.anneal_beta:
            beta *= solver.kappa
        if error < best:
            best = error
        elif solver.early_stop:
            break
    return zero


def _group(w: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    return w.reshape(-1, group_size) if axis == 1 else w.reshape(group_size, -1)


def _quantize_raw(weight: torch.Tensor, nbits: int, group_size: int | None, axis: int, channel_wise: bool,
                  optimize: bool, round_zero: bool, solver: HQQSolver):
    """Codes [G, C] (float), inverse-free dequant scale and zero, both float32."""
    w = weight.float()
    if channel_wise and group_size is not None:
        w = _group(w, group_size, axis)
    if channel_wise:
        lo, hi = w.min(axis, keepdim=True)[0], w.max(axis, keepdim=True)[0]
    else:
        lo, hi, optimize = w.min(), w.max(), False
    qmax = 2 ** nbits - 1
    span = hi - lo
    scale = qmax / span
    scale = torch.where(span.abs() <= 1e-4, torch.ones_like(scale), scale).clamp(max=2e4)
    zero = -lo * scale
    if round_zero:
        zero = torch.round(zero)
    if optimize:
        zero = solve_zero(w, scale, zero, qmax, axis, solver)
    q = torch.round(w * scale + zero).clamp(0, qmax)
    return q, 1.0 / scale, zero


def hqq_quantize(weight: torch.Tensor, nbits: int = 4, group_size: int = 64, axis: int = 1,
                 optimize: bool = True, round_zero: bool | None = None, quant_scale: bool = False,
                 quant_zero: bool = False, meta_dtype: torch.dtype = torch.float32,
                 solver: HQQSolver = HQQSolver()) -> HQQState:
    """Quantise `weight` (any float tensor; numel divisible by `group_size`) with HQQ.

    round_zero defaults to the package's choice (True at 4 bits only). meta_dtype is the dtype of
    the stored scale and zero (the package keeps them in its compute dtype, float16 by default).
    """
    if nbits not in HQQ_BITS:
        raise ValueError(f"hqq: nbits must be one of {HQQ_BITS}, got {nbits}")
    if axis not in (0, 1):
        raise ValueError(f"hqq: axis must be 0 or 1, got {axis}")
    if group_size <= 0 or weight.numel() % group_size:
        raise ValueError(f"hqq: group_size {group_size} does not divide the {weight.numel()} values "
                         f"of a weight of shape {list(weight.shape)}")
    if round_zero is None:
        round_zero = nbits == 4
    q, scale, zero = _quantize_raw(weight, nbits, group_size, axis, True, optimize, round_zero, solver)
    state = HQQState(pack_codes(q, nbits), scale.to(meta_dtype), zero.to(meta_dtype), torch.Size(weight.shape),
                     nbits, group_size, axis, round_zero, optimize)
    if quant_scale:
        state.scale_q, state.scale = _quantize_meta(scale, channel_wise=True), None
    if quant_zero:
        state.zero_q, state.zero = _quantize_meta(zero, channel_wise=False), None
    return state


def _quantize_meta(t: torch.Tensor, channel_wise: bool) -> HQQState:
    """8-bit state of a scale (groups of 128 along axis 0) or a zero (one range for the tensor)."""
    group = 128 if channel_wise else None
    if channel_wise and t.numel() % group:
        raise ValueError(f"hqq: quantising scales needs a multiple of 128 groups, got {t.numel()}")
    q, scale, zero = _quantize_raw(t, 8, group, 0, channel_wise, False, False, HQQSolver())
    codes = q if q.dim() == 2 else q.reshape(-1, 1)
    return HQQState(pack_codes(codes, 8), scale, zero, torch.Size(t.shape), 8, group or 0, 0, False, False,
                    channel_wise)


def hqq_dequantize(state: HQQState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero) * scale, reshaped to the weight's shape ([out, in] for a linear weight:
    matmul-ready). Computed in float32 and rounded once to `dtype`."""
    scale, zero = state.meta_tensors(torch.float32)
    codes = state.codes().float()
    return ((codes - zero) * scale).reshape(state.shape).to(dtype)


def hqq_bits_per_param(nbits: int, group_size: int = 64, quant_scale_zero: bool = False,
                       meta_bits: int = 16) -> float:
    """Storage bits per weight: packed codes (3-bit packs 10 codes in 32 bits) plus the scale and zero
    per group, each `meta_bits` wide (the compute dtype), or 8-bit codes when quantised (plus an
    8-bit scale's own scale and zero per 128 groups)."""
    code_bits = 32 / _PER_WORD[_PACKING[nbits]] if nbits == 3 else nbits
    if quant_scale_zero:
        return code_bits + (8 + 8 + 2 * meta_bits / 128) / group_size
    return code_bits + 2 * meta_bits / group_size


def hqq_quantization_config(nbits: int = 4, group_size: int = 64, axis: int = 1,
                            skip_modules: tuple[str, ...] = ("lm_head",)) -> dict:
    """The `quantization_config` of config.json, as transformers' HqqConfig writes it."""
    return {"quant_method": "hqq", "skip_modules": list(skip_modules),
            "quant_config": {"weight_quant_params": {"nbits": nbits, "channel_wise": True, "group_size": group_size,
                                                     "optimize": True, "round_zero": nbits == 4, "axis": axis,
                                                     "view_as_float": False},
                             "scale_quant_params": None, "zero_quant_params": None, "offload_meta": False}}


# ---------------------------------------------------------------------------------------------
# State dict in the `hqq` package's encoded (safetensors-ready) layout

def _flag(value: bool) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.uint8)


def _text(value: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in value], dtype=torch.uint8)


def hqq_state_dict(state: HQQState, prefix: str = "", compute_dtype: torch.dtype | None = None) -> dict:
    """Tensors under the keys `HQQLinear.state_dict()` writes for a layer at `prefix` (include the dot)."""
    p = prefix
    compute_dtype = compute_dtype or (state.scale.dtype if state.scale is not None else torch.float16)
    out = {f"{p}W_q": state.packed, f"{p}nbits": torch.tensor(state.nbits, dtype=torch.int32),
           f"{p}group_size": torch.tensor(state.group_size, dtype=torch.int32),
           f"{p}shape": torch.tensor(list(state.shape)), f"{p}axis": torch.tensor(state.axis, dtype=torch.int32),
           f"{p}packing": _text(state.packing), f"{p}unpack_view_dtype": _text(str(_VIEW_DTYPE[state.packing])),
           f"{p}compute_dtype": _text(str(compute_dtype)), f"{p}view_as_float": _flag(False),
           f"{p}quant_scale": _flag(state.scale_q is not None), f"{p}quant_zero": _flag(state.zero_q is not None),
           f"{p}offload_meta": _flag(False), f"{p}encoded_state_dict": _flag(True),
           f"{p}stores_quant_config": _flag(True), f"{p}channel_wise": _flag(state.channel_wise),
           f"{p}optimize": _flag(state.optimize), f"{p}round_zero": _flag(state.round_zero)}
    for name, plain, quantised in (("scale", state.scale, state.scale_q), ("zero", state.zero, state.zero_q)):
        if quantised is None:
            out[f"{p}{name}"] = plain
        else:   # qforge's extension: the package cannot serialise quantised meta-data
            out[f"{p}{name}_q"] = quantised.packed
            out.update({k: v for k, v in hqq_state_dict(quantised, f"{p}meta_{name}.").items()
                        if not k.endswith(".W_q")})
    return out


def hqq_from_state_dict(state_dict: dict, prefix: str = "") -> HQQState:
    """Rebuild an HQQState from `hqq_state_dict` keys (or a file the `hqq` package wrote).

    A missing or inconsistent key is a ValueError naming it."""
    p = prefix

    def need(key: str) -> torch.Tensor:
        if p + key not in state_dict:
            raise ValueError(f"hqq state dict: missing key '{p}{key}'")
        return state_dict[p + key]

    def flag(key: str, default: bool) -> bool:
        return bool(state_dict[p + key].item()) if p + key in state_dict else default

    nbits, group_size = int(need("nbits").item()), int(need("group_size").item())
    shape, axis = torch.Size(need("shape").tolist()), int(need("axis").item())
    if nbits not in HQQ_BITS:
        raise ValueError(f"hqq state dict: key '{p}nbits' is {nbits}, expected one of {HQQ_BITS}")
    packing = "".join(chr(c) for c in need("packing").tolist())
    if packing != _PACKING[nbits]:
        raise ValueError(f"hqq state dict: key '{p}packing' is '{packing}', expected '{_PACKING[nbits]}' for {nbits} bits")
    state = HQQState(need("W_q"), None, None, shape, nbits, group_size, axis, flag("round_zero", False),
                     flag("optimize", True), flag("channel_wise", True))
    rows = state.grouped_shape[0]
    words = -(-rows // _PER_WORD[packing])
    if state.packed.dtype != _VIEW_DTYPE[packing] or state.packed.shape[0] != words:
        raise ValueError(f"hqq state dict: key '{p}W_q' is {state.packed.dtype} {list(state.packed.shape)}, "
                         f"expected {_VIEW_DTYPE[packing]} [{words}, {state.grouped_shape[1]}] for shape "
                         f"{list(shape)}, {nbits} bits, group size {group_size}, axis {axis}")
    for name in ("scale", "zero"):
        if flag(f"quant_{name}", False):
            sub = hqq_from_state_dict({**state_dict, f"{p}meta_{name}.W_q": need(f"{name}_q")}, f"{p}meta_{name}.")
            setattr(state, f"{name}_q", sub)
        else:
            setattr(state, name, need(name))
    return state


# ---------------------------------------------------------------------------------------------
# quant_type names ("hqq4", "hqq3", "hqq2"), as TrainConfig, the loader and the commands spell them

HQQ_QUANT_TYPES = ("hqq4", "hqq3", "hqq2")
HQQ_META_DTYPE = torch.float16  # the package's default compute dtype, which is its scales' and zeros' dtype


def hqq_nbits(quant_type: str) -> int | None:
    """4, 3 or 2 for "hqq4" / "hqq3" / "hqq2"; None for any other quant type (nf4, fp4, ...)."""
    if isinstance(quant_type, str) and quant_type.startswith("hqq"):
        if quant_type not in HQQ_QUANT_TYPES:
            raise ValueError(f"quant type '{quant_type}': HQQ is offered at {', '.join(HQQ_QUANT_TYPES)}")
        return int(quant_type[3:])
    return None


def check_hqq_group_size(group_size: int, shape, name: str = "weight") -> None:
    """ValueError naming `name` when `group_size` does not cut a weight of `shape` into whole groups."""
    numel = int(torch.Size(shape).numel())
    if not isinstance(group_size, int) or group_size <= 0 or numel % group_size:
        raise ValueError(f"hqq: group size {group_size} does not divide the {numel} values of {name} "
                         f"(shape {list(shape)}); choose a group size that divides it (64 is the default)")


def hqq_state_keys(state_dict, prefix: str) -> list[str]:
    """The keys of an HQQ-quantised layer at `prefix` (include the dot) in a state dict: every key
    `hqq_state_dict` writes there (W_q, scale, zero, nbits, ..., meta_scale.*), not its bias."""
    names = {"W_q", "scale", "zero", "scale_q", "zero_q", "nbits", "group_size", "shape", "axis", "packing",
             "unpack_view_dtype", "compute_dtype", "view_as_float", "quant_scale", "quant_zero", "offload_meta",
             "encoded_state_dict", "stores_quant_config", "channel_wise", "optimize", "round_zero"}
    out = []
    for key in state_dict:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in names or rest.startswith(("meta_scale.", "meta_zero.")):
            out.append(key)
    return out
