"""QuantState: everything needed to undo a 4-bit quantisation, and its bitsandbytes checkpoint form.

A quantised `weight` is stored under bitsandbytes' keys (prefix = the weight's own key):
  prefix                                   uint8 [(n+1)//2, 1]  the packed codes
  prefix.absmax                            float32 [blocks], or uint8 [blocks] when nested
  prefix.quant_map                         float32 [16]
  prefix.nested_absmax                     float32 [ceil(blocks/256)]        (nested only)
  prefix.nested_quant_map                  float32 [256]                     (nested only)
  prefix.quant_state.bitsandbytes__<type>  uint8 bytes of UTF-8 JSON: quant_type, blocksize, dtype,
                                           shape (+ nested_blocksize, nested_dtype, nested_offset)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _state_key(quant_type: str) -> str:
    # int4 is qforge's own baseline; bitsandbytes knows only nf4 and fp4.
    return f"quant_state.{'qforge' if quant_type == 'int4' else 'bitsandbytes'}__{quant_type}"


@dataclass
class QuantState:
    """A 4-bit blockwise-quantised tensor.

    packed: uint8 [(n+1)//2, 1], two codes a byte (element 2j high nibble).
    absmax: float32 [blocks]; when double-quantised, uint8 codes into `nested_code`, with
            absmax = nested_code[absmax] * nested_absmax[block // nested_blocksize] + offset.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int | None = None
    offset: float | None = None
    nested_dtype: torch.dtype = field(default=torch.float32)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def nbytes(self) -> int:
        """Bytes this state occupies: packed codes, scales and constants."""
        tensors = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                          self.quant_type, move(self.code), move(self.nested_absmax), move(self.nested_code),
                          self.nested_blocksize, self.offset, self.nested_dtype)

    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes writes for a quantised parameter named `prefix`."""
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": dtype_name(self.dtype), "shape": list(self.shape)}
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.nested:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype=dtype_name(self.nested_dtype),
                        nested_offset=float(self.offset))
        raw = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.{_state_key(self.quant_type)}"] = torch.tensor(list(raw), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str = "weight") -> "QuantState":
        """Rebuild from bitsandbytes' keys; a missing or inconsistent key is a ValueError naming it."""
        def need(key: str) -> torch.Tensor:
            if key not in state_dict:
                raise ValueError(f"quantised state dict: missing key '{key}'")
            return state_dict[key]

        meta_keys = [f"{prefix}.{_state_key(t)}" for t in QUANT_TYPES]
        found = [k for k in meta_keys if k in state_dict]
        if len(found) != 1:
            raise ValueError(f"quantised state dict: expected exactly one of {meta_keys}, found {found or 'none'}")
        meta_key = found[0]
        try:
            meta = json.loads(bytes(state_dict[meta_key].tolist()).decode("utf-8"))
            quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
            dtype, shape = _DTYPES[meta["dtype"]], torch.Size(meta["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"quantised state dict: key '{meta_key}' does not hold valid metadata ({exc})") from exc
        if not meta_key.endswith("__" + quant_type):
            raise ValueError(f"quantised state dict: key '{meta_key}' says quant_type '{quant_type}'")
        packed, absmax, code = need(prefix), need(f"{prefix}.absmax"), need(f"{prefix}.quant_map")
        n, blocks = shape.numel(), -(-shape.numel() // blocksize)
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"quantised state dict: key '{prefix}' has {packed.numel()} {packed.dtype} values, "
                             f"expected {(n + 1) // 2} uint8 for shape {list(shape)}")
        if absmax.numel() != blocks:
            raise ValueError(f"quantised state dict: key '{prefix}.absmax' has {absmax.numel()} values, "
                             f"expected {blocks} (shape {list(shape)}, blocksize {blocksize})")
        if code.numel() != 16:
            raise ValueError(f"quantised state dict: key '{prefix}.quant_map' has {code.numel()} values, expected 16")
        state = cls(packed.reshape(-1, 1), absmax, shape, dtype, blocksize, quant_type, code.float())
        if "nested_offset" in meta or f"{prefix}.nested_absmax" in state_dict:
            state.nested_absmax = need(f"{prefix}.nested_absmax").float()
            state.nested_code = need(f"{prefix}.nested_quant_map").float()
            try:
                state.nested_blocksize = int(meta["nested_blocksize"])
                state.offset = float(meta["nested_offset"])
                state.nested_dtype = _DTYPES[meta.get("nested_dtype", "float32")]
            except KeyError as exc:
                raise ValueError(f"quantised state dict: key '{meta_key}' lacks {exc} for a nested state") from exc
            if absmax.dtype != torch.uint8:
                raise ValueError(f"quantised state dict: key '{prefix}.absmax' must be uint8 when nested")
            if state.nested_absmax.numel() != -(-blocks // state.nested_blocksize):
                raise ValueError(f"quantised state dict: key '{prefix}.nested_absmax' has "
                                 f"{state.nested_absmax.numel()} values, expected {-(-blocks // state.nested_blocksize)}")
        elif absmax.dtype != torch.float32:
            raise ValueError(f"quantised state dict: key '{prefix}.absmax' must be float32 when not nested")
        return state
