"""Adapters on disk and out of the model: PEFT-format files, LoftQ initialisation, the QLoRA merge."""
from .loftq import loftq_error, loftq_init, loftq_linear, quantize_linears_loftq
from .merge import (InPlaceMergeError, merge_in_place_4bit, merge_records, merged_state_dict,
                    requantized_state_dict, save_merged)
from .peft_format import adapter_config, load_adapter, read_adapter_config, save_adapter

__all__ = ["save_adapter", "load_adapter", "adapter_config", "read_adapter_config", "loftq_init", "loftq_linear",
           "quantize_linears_loftq", "loftq_error", "merged_state_dict", "requantized_state_dict", "save_merged",
           "merge_in_place_4bit", "merge_records", "InPlaceMergeError"]
