"""qforge: QLoRA fine-tuning end to end on one machine."""
__version__ = "0.1.0"
