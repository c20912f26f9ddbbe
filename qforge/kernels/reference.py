"""Pure-torch 4-bit blockwise kernels: the oracle every fast path is tested against.

Semantics (bitsandbytes 0.50, bit for bit):
  * blocks of `blocksize` consecutive values of the flattened input; absmax in float32;
  * full blocks are scaled by multiplying with 1/absmax, a trailing partial block by dividing by
    its absmax (bitsandbytes does exactly this, and the two differ in the last bit); absmax is
    clamped to 1e-38 before either so an all-zero block maps to the level of 0;
  * the code is the sorted position #{bounds < v} mapped through `order` (ties go to the lower level);
  * codes are packed two per byte, element 2j in the high nibble; an odd tail is padded with the
    code of 0.0.
"""
from __future__ import annotations

import torch

_TINY = 1e-38


def quantize_4bit(x: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor):
    """x: any float tensor -> (packed uint8 [(n+1)//2], absmax float32 [ceil(n/blocksize)])."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail.abs().amax().unsqueeze(0)])
        scaled = torch.cat([scaled, (tail / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = order.long()[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor,
                    n: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(n+1)//2], absmax float32 [blocks], levels float32[16] -> dtype [n]."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    values = levels[codes]  # float32, as bitsandbytes: level * absmax in fp32, then one rounding
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype)


_LUT_SIZE = 65536


def code_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65536 evenly spaced points v_i = -1 + 2i/65535 of [-1, 1], the index of the
    nearest entry of the sorted map `code` (ties to the lower one): #{midpoints < v_i}."""
    mids = 0.5 * (code[:-1] + code[1:])
    points = (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1) + -1.0
    return torch.searchsorted(mids, points, side="left").to(torch.uint8)


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int, table: torch.Tensor | None = None):
    """Blockwise 8-bit quantisation against a sorted 256-entry map, as bitsandbytes' CPU kernel does it.

    Each value is scaled by 1/absmax, clamped to [-1, 1], rounded onto a grid of 65536 points and
    mapped through a table of nearest map entries (`table`, built from `code` when not given);
    every step is a separate float32 rounding.
    An all-zero block gets absmax 0 and codes 0. x: float32 [n] -> (uint8 [n], float32 [blocks]).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = (padded * inv.unsqueeze(1)).clamp(-1, 1)
    t = ((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5
    table = code_lookup_table(code) if table is None else table
    idx = table[t.to(torch.int64)]
    idx[absmax == 0] = 0
    return idx.reshape(-1)[:n].contiguous(), absmax


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 [n] codes -> float32 [n] = code[q] * absmax[block]."""
    n = q.numel()
    return code[q.reshape(-1).long()] * absmax.repeat_interleave(blocksize)[:n]


# ---- counter-based dropout -----------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on int64 tensors holding 32-bit values (products wrap; the low 32 bits
    are what the C kernel's uint32 arithmetic keeps)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep(n: int, threshold: int, seed: int, device=None) -> torch.Tensor:
    """The keep mask [n] of seed: hash(i, seed) >> 8 >= threshold (threshold = ceil(p * 2^24))."""
    seed_lo, seed_hi = seed & _M32, (seed >> 32) & _M32
    i = torch.arange(n, dtype=torch.int64, device=device) & _M32
    h = _mix32((_mix32(i ^ seed_lo) + seed_hi) & _M32)
    return (h >> 8) >= threshold


def dropout(x: torch.Tensor, threshold: int, scale: float, seed: int) -> torch.Tensor:
    """x * scale where kept, 0 elsewhere; the product in float32, rounded once to x's dtype."""
    keep = dropout_keep(x.numel(), threshold, seed, x.device).view(x.shape)
    value = (x.float() * scale).to(x.dtype)
    return torch.where(keep, value, torch.zeros((), dtype=x.dtype, device=x.device))


def gathered_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                  scalings: torch.Tensor) -> torch.Tensor:
    """Per-row adapters: delta[b] = s[k] * (x[b] @ A[k]^T) @ B[k]^T with k = slots[b], zero where k is
    outside 0..K-1. x [B, T, in] or [B, in]; A [K, r, in]; B [K, out, r]; scalings [K]. Each row's
    factors are gathered (B * r * (in + out) values, small next to the base weight) and multiplied
    in batch; h = x A^T is scaled and rounded to x's dtype before B, as the Triton kernel does."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    K = A.shape[0]
    slots = slots.to(x.device).reshape(-1).long()
    if K == 0:
        y = x3.new_zeros(*x3.shape[:2], B.shape[1])
        return y if x.dim() == 3 else y.squeeze(1)
    valid = (slots >= 0) & (slots < K)
    index = slots.clamp(0, K - 1)
    wide = torch.promote_types(x.dtype, torch.float32)
    scale = scalings.to(device=x.device, dtype=wide)[index] * valid                   # [B]
    h = torch.bmm(x3, A.to(x.dtype)[index].transpose(1, 2))                           # [B, T, r]
    h = (h.to(wide) * scale[:, None, None]).to(x.dtype)
    y = torch.bmm(h, B.to(x.dtype)[index].transpose(1, 2))                            # [B, T, out]
    return y if x.dim() == 3 else y.squeeze(1)


def concatenated_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor,
                      scalings: torch.Tensor) -> torch.Tensor:
    """gathered_lora's delta without per-row gathers: every slot's factors concatenated along the
    rank, h = x [A_0; ...; A_K-1]^T for all K*r columns in one product, each row's columns outside its
    own slot's block set to zero (and its own scaled), then one product with [B_0 ... B_K-1]. K times
    gathered_lora's multiply-adds, but two plain GEMMs and no copies of B*r*(in+out) gathered values:
    faster for a few adapters of small rank (serving's usual case on the CPU). The same values as
    gathered_lora up to the order of float accumulation (the other slots add exact zeros)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    K, r, n_in = A.shape
    n_out = B.shape[1]
    slots = slots.to(x.device).reshape(-1).long()
    if K == 0:
        y = x3.new_zeros(*x3.shape[:2], n_out)
        return y if x.dim() == 3 else y.squeeze(1)
    valid = (slots >= 0) & (slots < K)
    wide = torch.promote_types(x.dtype, torch.float32)
    scale = scalings.to(device=x.device, dtype=wide)[slots.clamp(0, K - 1)] * valid              # [B]
    own = torch.arange(K, device=x.device)[None, :] == slots[:, None]                           # [B, K]
    mask = (own.to(wide) * scale[:, None]).repeat_interleave(r, dim=1)                          # [B, K*r]
    h = torch.matmul(x3, A.to(x.dtype).reshape(K * r, n_in).t())                                # [B, T, K*r]
    h = (h.to(wide) * mask[:, None, :]).to(x.dtype)
    y = torch.matmul(h, B.to(x.dtype).permute(1, 0, 2).reshape(n_out, K * r).t())              # [B, T, out]
    return y if x.dim() == 3 else y.squeeze(1)
