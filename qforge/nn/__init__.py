"""4-bit linear layers with LoRA / DoRA adapters."""
from .lora import LoraAdapter, LoraSpec
from .qlinear import LoRALinear, QLoRALinear, dequantize_cached

__all__ = ["QLoRALinear", "LoRALinear", "LoraAdapter", "LoraSpec", "dequantize_cached"]
