"""DoRA (weight-decomposed low-rank adaptation) as a LoRA variant: its weights, init, forward and merge.

    W' = m * (W + s B A) / ||W + s B A||_row

m [out] is the trained magnitude; the norm is taken per output row and treated as a constant in
backward (DoRA paper, section 4.3, as PEFT does). m starts as the row norms of W + s B A, i.e. of
the dequantised base when B = 0, so the adapted layer starts equal to the base. In PEFT's files
m is `lora_magnitude_vector`.
"""
from __future__ import annotations

import torch
from torch import nn

from .lora import LoraAdapter, LoraVariant


class DoraVariant(LoraVariant):
    name = "dora"
    extra_weights = {"magnitude": "lora_magnitude_vector"}

    def create(self, adapter: LoraAdapter, out_features: int, dtype: torch.dtype) -> None:
        adapter.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype))

    @staticmethod
    def _row_norms(layer, adapter: LoraAdapter) -> torch.Tensor:
        """||W + s B A|| per output row, float32 [out]."""
        return (layer.base.weight(torch.float32) + adapter.delta_weight()).norm(dim=1)

    @torch.no_grad()
    def init(self, layer, adapter: LoraAdapter) -> None:
        adapter.magnitude.copy_(self._row_norms(layer, adapter))

    def fused(self, layer, adapter: LoraAdapter, x: torch.Tensor) -> None:
        return None  # the fused kernel knows no magnitude

    def apply(self, layer, adapter: LoraAdapter, x: torch.Tensor, base_out: torch.Tensor,
              low: torch.Tensor | None = None) -> torch.Tensor:
        """base_out + (m/||W + sBA|| - 1) W x + m/||W + sBA|| s B A x, in base_out's dtype (float32
        with the float32 residual, as LoRA's sum). base_out = W x + b: the bias, as in PEFT, takes
        no scale (subtracted from base_out for the scaled part)."""
        low = adapter.low_rank(x) if low is None else low
        with torch.no_grad():  # the norm is a constant for backward
            norm = self._row_norms(layer, adapter)
        scale = (adapter.magnitude.float() / norm).to(base_out.dtype)                 # (out,)
        base = base_out if layer.bias is None else base_out - layer.bias
        return base_out + ((scale - 1) * base + scale * low.to(base_out.dtype))

    @torch.no_grad()
    def merged_weight(self, w: torch.Tensor, adapter: LoraAdapter) -> torch.Tensor:
        # the runtime norm is detached, but it is the same number: m / ||W + sBA|| per row
        w = w + adapter.delta_weight().to(w.device)
        return w * (adapter.magnitude.detach().float() / w.norm(dim=1))[:, None]

    @torch.no_grad()
    def serving_scale(self, layer, adapter: LoraAdapter) -> torch.Tensor:
        """m / ||W + s B A||: at inference DoRA's output is this factor times (base + low-rank)."""
        return adapter.magnitude.float() / self._row_norms(layer, adapter)


DORA = DoraVariant()
