"""How much a 4-bit format loses: mean squared error, signal-to-quantisation-noise, bits per parameter."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import dequantize, quantize
from .hqq import hqq_dequantize, hqq_quantize


@dataclass
class Fidelity:
    dataset: str
    fmt: str            # e.g. "nf4+dq"
    mse: float          # mean of (w - dequant(quant(w)))^2, float32
    sqnr_db: float      # 10 log10(sum w^2 / sum (w - w_hat)^2)
    bits_per_param: float


def measure(name: str, weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = 64) -> Fidelity:
    """Quantise `weight` once and compare the round trip with the original in float32."""
    w = weight.float()
    state = quantize(w, quant_type, blocksize, double_quant)
    err = (dequantize(state, torch.float32) - w).pow(2)
    noise = err.sum().item()
    sqnr = 10 * math.log10(w.pow(2).sum().item() / noise) if noise > 0 else math.inf
    return Fidelity(name, quant_type + ("+dq" if double_quant else ""), err.mean().item(), sqnr,
                    state.nbytes() * 8 / w.numel())


def measure_hqq(name: str, weight: torch.Tensor, nbits: int, group_size: int = 64) -> Fidelity:
    """HQQ's round trip; bits per parameter with scales and zeros in float16 (the compute dtype)."""
    w = weight.float()
    state = hqq_quantize(w.reshape(-1, group_size), nbits, group_size, meta_dtype=torch.float16)
    err = (hqq_dequantize(state, torch.float32).reshape(w.shape) - w).pow(2)
    noise = err.sum().item()
    sqnr = 10 * math.log10(w.pow(2).sum().item() / noise) if noise > 0 else math.inf
    return Fidelity(name, f"hqq{nbits}", err.mean().item(), sqnr, state.nbytes() * 8 / w.numel())


def fidelity_table(datasets: dict[str, torch.Tensor], quant_types=("nf4", "fp4", "int4")) -> list[Fidelity]:
    """Every dataset x format x double-quant combination, in that order."""
    return [measure(name, w, qt, dq) for name, w in datasets.items() for qt in quant_types for dq in (False, True)]


def format_table(rows: list[Fidelity]) -> str:
    """A markdown table of `rows`."""
    lines = ["| weights | format | MSE | SQNR (dB) | bits/param |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r.dataset} | {r.fmt} | {r.mse:.4e} | {r.sqnr_db:.2f} | {r.bits_per_param:.3f} |" for r in rows]
    return "\n".join(lines)


def standard_datasets(n: int = 1 << 20, seed: int = 0,
                      weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """N(0, 1), Student-t (df=5) and the caller's real `weights` (e.g. {"smollm2":
    qforge.model.embedded.smollm2_sample_weights()}), flattened."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g)
    chi2 = (torch.randn(n, 5, generator=g) ** 2).sum(-1)
    sets = {"normal": normal, "student_t5": torch.randn(n, generator=g) / torch.sqrt(chi2 / 5)}
    sets.update({name: w.reshape(-1) for name, w in (weights or {}).items()})
    return sets
