"""Optimisers: 8-bit (optionally paged) AdamW.

qmap: blockwise 8-bit quantisation maths; adamw8bit: the pure per-parameter step and the
Optimizer class; paging: where state lives and how it reaches the parameter's device.
"""
from .adamw8bit import AdamW8bit, adamw_step, init_state
from .qmap import dequantize_blockwise, dynamic_quant_map, quantize_blockwise

__all__ = ["AdamW8bit", "adamw_step", "init_state", "quantize_blockwise", "dequantize_blockwise", "dynamic_quant_map"]
