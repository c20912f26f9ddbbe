"""Attention for training on the CPU: plain matrix products for short sequences, SDPA otherwise.

torch's CPU SDPA kernel (flash attention for the CPU) works in tiles sized for long sequences; for
the short rows of chat fine-tuning its backward is the slow part (SmolLM2, batch 4 x ~100 tokens:
~4.7 ms per layer, ~10% of a QLoRA step). Two batched matrix products and a softmax do the same
there in less time, and their T x T scores are small while T is: at most MATH_MAX_SCORES elements
per call (2M: batch 4 x 9 heads x 240 x 240), and with gradient checkpointing only one layer's
are alive at a time.

`qforge_attention` is registered with transformers under the name "qforge" (AttentionInterface,
with SDPA's mask function), so `model.set_attn_implementation("qforge")` selects it; qforge's
trainer selects it only for models that run SDPA (surgery.use_qforge_attention). It takes the
matrix path only on CPU tensors, with autograd recording, without a KV cache (query and key of the
same length), without arguments it does not implement (UNSUPPORTED) and up to MATH_MAX_SCORES
scores; every other call goes to transformers' SDPA function unchanged. The matrix path is
transformers' eager attention: scores in the compute dtype, masked with the dtype's lowest value,
softmax in float32, probabilities back in the compute dtype; a query row with nothing to attend to
(left padding) outputs zeros, as SDPA's kernel gives.

Float32 queries under autocast (the float32 residual stream, qforge.model.surgery.
use_float32_residual, the default for adapter training) take the matrix path at SDPA's precision
under autocast, which is what PEFT's recipe runs: query, key and value rounded to the compute dtype,
the scores kept in float32 (products of compute-dtype values, summed in float32, never rounded to
BF16 before the softmax), probabilities in the compute dtype against the compute-dtype values.
Rounding the scores to BF16 instead (the eager path above) measurably moved the first-step
gradients on the embedded model (cosine 0.9983 to PEFT's), which this form does not.
"""
from __future__ import annotations

import torch

from ..kernels import dispatch

NAME = "qforge"
MATH_MAX_SCORES = 2 * 1024 * 1024
# attention-function arguments of some models (Gemma 2's logit soft-capping, gpt-oss' sinks) that
# the matrix path does not implement: calls that carry them go to SDPA's function unchanged
UNSUPPORTED = ("softcap", "s_aux", "sinks")


def _math_attention(query, key, value, mask, scaling, dropout, causal=True, wide_scores=False):
    """query (B, H, T, D), key/value (B, Hkv, T, D), mask bool (B|1, 1|H, T, T) True = attend, a
    float mask to add, or None: causal, or nothing masked when not `causal`. wide_scores: every
    product in float32 from the inputs as they are (call it with autocast off), probabilities kept
    in float32. Returns (B, T, H, D) in value's dtype."""
    b, h, t, d = query.shape
    out_dtype = value.dtype
    if wide_scores:  # before the repeat below, so each shared head's gradient is summed in float32
        query, key, value = query.float(), key.float(), value.float()
    groups = h // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is None:
        if causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=query.device).tril_()
    elif mask.dtype != torch.bool:  # an additive float mask
        scores = scores + mask[..., : key.shape[-2]]
        mask = None
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if not wide_scores:
        probs = probs.to(value.dtype)
    if mask is not None:  # a query that may attend to nothing (padding) gets 0, as SDPA gives it
        empty = ~mask.any(dim=-1, keepdim=True)
        if bool(empty.any()):
            probs = probs.masked_fill(empty, 0.0)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value.to(probs.dtype)).to(out_dtype)
    return out.transpose(1, 2).contiguous()


def qforge_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     **kwargs):
    """transformers' attention-function signature; see the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, t, d = query.shape
    plain = all(kwargs.get(k) is None for k in UNSUPPORTED)  # nothing the matrix path does not do
    if (plain and torch.is_grad_enabled() and key.shape[-2] == t
            and dispatch.matrix_attention(query, b * h * t * t, MATH_MAX_SCORES)):
        # without a mask, causal as transformers' SDPA function decides it
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        scale = scaling if scaling is not None else d ** -0.5
        p = dropout if module.training else 0.0
        device = query.device.type
        if query.dtype == torch.float32 and torch.is_autocast_enabled(device):  # the float32 residual
            low = torch.get_autocast_dtype(device)  # SDPA's inputs under autocast; see the module docstring
            with torch.autocast(device, enabled=False):
                out = _math_attention(query.to(low), key.to(low), value.to(low), attention_mask, scale, p, causal,
                                      wide_scores=True)
            return out, None
        return _math_attention(query, key, value, attention_mask, scale, p, causal), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> str:
    """Register "qforge" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, qforge_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
