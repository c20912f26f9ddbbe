"""The adapter layer: AdaptedLinear over a frozen base (4-bit, dense, sharded 4-bit, HQQ), LoRA and DoRA."""
from .bases import DenseBase, FrozenBase, QuantizedBase, Quant4bitBase, ShardedQuant4bitBase, dequantize_cached
from .hqq_base import HQQBase, quantized_base
from .dora import DORA, DoraVariant
from .linear import AdaptedLinear
from .lora import LORA, LoraAdapter, LoraSpec, LoraVariant, add_low_rank, low_rank

__all__ = ["AdaptedLinear", "FrozenBase", "QuantizedBase", "Quant4bitBase", "DenseBase", "ShardedQuant4bitBase",
           "LoraAdapter", "LoraSpec", "LoraVariant", "LORA", "DoraVariant", "DORA", "dequantize_cached", "HQQBase",
           "quantized_base", "low_rank", "add_low_rank"]
