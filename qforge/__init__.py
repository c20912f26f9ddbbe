"""qforge: QLoRA fine-tuning end to end on one machine.

The names a script needs, imported on first use (so `import qforge` stays cheap):

    model, tok = qforge.load_model("smollm2")                                 # NF4 base (no adapters)
    cfg = qforge.TrainConfig(data="train.jsonl", output_dir="runs/x")
    result, summary = qforge.train(cfg)                                       # load, train, save
    run = qforge.prepare(cfg); run.train(on_step=print); run.save()           # the same, in parts
    qforge.merge(model, tok, "runs/merged")                                   # dequantise, merge
    state = qforge.quantize(weight); w = qforge.dequantize(state)             # NF4 / FP4 tensors
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "load_model": ("qforge.model.load", "load_model"),
    "LoraSpec": ("qforge.nn.lora", "LoraSpec"),
    "quantize": ("qforge.quant.blockwise", "quantize"),
    "dequantize": ("qforge.quant.blockwise", "dequantize"),
    "TrainConfig": ("qforge.train.config", "TrainConfig"),
    "prepare": ("qforge.train.run", "prepare"),
    "train": ("qforge.train", None),  # the package itself, callable: qforge.train(cfg) runs run_training
    "merge": ("qforge.adapters.merge", "save_merged"),
    "load_adapter": ("qforge.adapters.peft_format", "load_adapter"),
    "save_adapter": ("qforge.adapters.peft_format", "save_adapter"),
    "resolve_device": ("qforge.devices", "resolve_device"),
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qforge' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
