"""4-bit NormalFloat / FP4 blockwise quantisation with double quantisation (bitsandbytes' format)."""
from .blockwise import BLOCKSIZES, block_absmax, dequantize, quantize
from .codebooks import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, FP4_LEVELS, INT4_LEVELS, NF4_LEVELS, dynamic_map
from .state import QUANT_TYPES, QuantState

__all__ = ["quantize", "dequantize", "block_absmax", "QuantState", "QUANT_TYPES", "BLOCKSIZES",
           "NF4_LEVELS", "FP4_LEVELS", "INT4_LEVELS", "DYNAMIC_SIGNED", "DYNAMIC_UNSIGNED", "dynamic_map"]
