"""4-bit NormalFloat / FP4 blockwise quantisation with double quantisation (bitsandbytes' format),
and HQQ at 4, 3 and 2 bits (the `hqq` package's format)."""
from .blockwise import BLOCKSIZES, block_absmax, dequantize, quantize
from .codebooks import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, FP4_LEVELS, INT4_LEVELS, NF4_LEVELS, dynamic_map
from .hqq import HQQSolver, HQQState, hqq_bits_per_param, hqq_dequantize, hqq_quantize
from .state import QUANT_TYPES, QuantState

__all__ = ["quantize", "dequantize", "block_absmax", "QuantState", "QUANT_TYPES", "BLOCKSIZES",
           "NF4_LEVELS", "FP4_LEVELS", "INT4_LEVELS", "DYNAMIC_SIGNED", "DYNAMIC_UNSIGNED", "dynamic_map",
           "HQQState", "HQQSolver", "hqq_quantize", "hqq_dequantize", "hqq_bits_per_param"]
