"""llama.cpp's Q4_K and Q6_K block formats, quantised here (the `gguf` package only dequantises them).

Both work on super-blocks of 256 values along a row (a row's length must be a multiple of 256).

Q4_K (144 bytes / 256 values, 4.5 bits): fp16 d, fp16 dmin, 12 bytes of 6-bit sub-scales and
sub-mins for 8 sub-blocks of 32, then 128 bytes of 4-bit codes. A value is
    d * sc[j] * q - dmin * m[j]           q in 0..15, sc and m in 0..63.
Scale bytes: b[i] = sc[i] | (sc[4+i] >> 4) << 6, b[4+i] = m[i] | (m[4+i] >> 4) << 6,
b[8+i] = (sc[4+i] & 15) | (m[4+i] & 15) << 4 (i < 4). Code byte 32c + k holds sub-block 2c's
value k in its low nibble and sub-block 2c+1's in its high nibble.

Q6_K (210 bytes / 256 values, 6.5625 bits): 128 bytes of low nibbles, 64 bytes of high 2-bit
pairs, 16 int8 sub-scales (sub-blocks of 16), fp16 d. A value is d * sc[j] * (q - 32), q in 0..63.
Value h*128 + r (h < 2, r < 128) keeps its low nibble in byte h*64 + r%64 (nibble r//64) and its
high bits in byte 128 + h*32 + r%32 (bits 2*(r//32)).

The scale choice is the plain one (range per sub-block, then 6/8-bit scales over the super-block
maximum), not llama.cpp's iterative search: same format, a little more error.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210


def _blocks(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    if rows.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows of a multiple of {QK_K} values, got {rows.shape[-1]}")
    return rows.reshape(-1, QK_K)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 [..., n*256] -> uint8 [..., n*144] in Q4_K."""
    shape = rows.shape
    x = _blocks(rows).reshape(-1, 8, 32)                         # (blocks, sub, 32)
    lo = np.minimum(x.min(-1), 0.0)
    scale, mins = (x.max(-1) - lo) / 15.0, -lo                   # both >= 0, (blocks, 8)
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(mins, dmin.astype(np.float32)[:, None])), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc                    # the effective sub-scales
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.rint(_safe_div(x + offset[..., None], step[..., None])), 0, 15).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=-1)
    qs = (q[:, 0::2] | q[:, 1::2] << 4).reshape(-1, 128)        # pairs of sub-blocks share bytes
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q4_K_BYTES)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """float32 [..., n*256] -> uint8 [..., n*210] in Q6_K."""
    shape = rows.shape
    x = _blocks(rows).reshape(-1, 16, 16)                        # (blocks, sub, 16)
    scale = np.abs(x).max(-1) / 31.0                             # (blocks, 16), >= 0
    d = (scale.max(-1) / 127.0).astype(np.float16)
    sc = np.clip(np.rint(_safe_div(scale, d.astype(np.float32)[:, None])), 0, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    q = (np.clip(np.rint(_safe_div(x, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    low, high = q & 15, q >> 4
    ql = (low[:, :, :64] | low[:, :, 64:] << 4).reshape(-1, 128)
    high = high.reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=-1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * Q6_K_BYTES)
