"""4-bit linear layers with LoRA / DoRA adapters."""
from .lora import LoraAdapter, LoraSpec
from .qlinear import QLoRALinear, dequantize_cached

__all__ = ["QLoRALinear", "LoraAdapter", "LoraSpec", "dequantize_cached"]
