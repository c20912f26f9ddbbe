"""Layer surgery on a transformers model: swap target nn.Linear layers for AdaptedLinear (over a
4-bit or dense base), attach and select adapters, and prepare the model for k-bit training. The
model class itself is untouched."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..nn import AdaptedLinear, LoraSpec

DEFAULT_SKIP = ("lm_head",)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of every base nn.Linear or AdaptedLinear in the model (not the adapters' own)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, AdaptedLinear)) and ".adapters." not in f".{n}."]


def select_targets(names: list[str], target_modules: str | list[str], skip=DEFAULT_SKIP) -> list[str]:
    """The linear layers that `target_modules` names: "all-linear" (every one but those in `skip`)
    or a list of last-name-component suffixes such as ["q_proj", "v_proj"]. An unknown suffix is a
    ValueError listing the ones the model has."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    if target_modules == "all-linear":
        return [n for n in names if n.rsplit(".", 1)[-1] not in skip]
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = sorted(set(wanted) - leaves)
    if unknown:
        raise ValueError(f"target_modules {unknown} not found in the model; its linear layers are {sorted(leaves)}")
    return [n for n in names if n.rsplit(".", 1)[-1] in wanted]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_linears(model: nn.Module, targets: list[str], quant_type="nf4", blocksize=64, double_quant=True,
                     compute_dtype=torch.bfloat16) -> None:
    """Replace each named nn.Linear by an AdaptedLinear holding its weight in 4 bits, one at a time
    (each dense weight is freed as soon as its replacement exists). quant_type hqq4/hqq3/hqq2: HQQ
    codes instead, blocksize being the group size (double_quant does not apply)."""
    for name in targets:
        linear = model.get_submodule(name)
        set_module(model, name, AdaptedLinear.quantized(linear, quant_type, blocksize, double_quant, compute_dtype))
        del linear


def dense_lora_linears(model: nn.Module, targets: list[str], compute_dtype=torch.bfloat16) -> None:
    """Replace each named nn.Linear by an AdaptedLinear over a frozen dense base, for BF16 LoRA."""
    for name in targets:
        set_module(model, name, AdaptedLinear.dense(model.get_submodule(name), compute_dtype))


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, layer) of every AdaptedLinear, whatever its base."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, layer) of every AdaptedLinear whose base is 4-bit codes (it has a quant_state)."""
    for name, layer in adapted_layers(model):
        if getattr(layer.base, "quant_state", None) is not None:
            yield name, layer


def hqq_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(name, layer) of every AdaptedLinear whose base is HQQ codes (it has an hqq_state)."""
    for name, layer in adapted_layers(model):
        if getattr(layer.base, "hqq_state", None) is not None:
            yield name, layer


def add_adapter(model: nn.Module, name: str, spec: LoraSpec) -> None:
    """Attach adapter `name` to every AdaptedLinear the spec targets and make it active."""
    layers = dict(adapted_layers(model))
    for layer_name in select_targets(list(layers), spec.target_modules, spec.modules_to_skip):
        layers[layer_name].add_adapter(name, spec)
    set_active_adapter(model, name)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    for _, layer in adapted_layers(model):
        layer.active_adapter = name if name in layer.adapters else None


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every AdaptedLinear of the model (and stop it being active)."""
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            del layer.adapters[name]
        if layer.active_adapter == name:
            layer.active_adapter = None


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(full name, parameter) of the adapters' weights, of one adapter or all."""
    for pname, param in model.named_parameters():
        parts = pname.split(".")
        if "adapters" in parts and (name is None or parts[parts.index("adapters") + 1] == name):
            yield pname, param


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True,
                              keep_base_outputs: bool = False) -> nn.Module:
    """Freeze everything but the adapters, keep norms in float32, let gradients reach the inputs of
    the first layer (needed by checkpointing with a frozen embedding), and turn on non-reentrant
    gradient checkpointing; keep_base_outputs makes it selective (qforge.nn.recompute: the
    recomputation takes each adapted layer's base product from forward)."""
    for pname, param in model.named_parameters():
        param.requires_grad = "adapters." in pname
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        from ..nn import recompute
        kwargs = {"use_reentrant": False,
                  "context_fn": recompute.keep_base_outputs if keep_base_outputs else recompute.recompute_everything}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = not gradient_checkpointing
    return model


def use_qforge_attention(model: nn.Module) -> bool:
    """Switch a transformers model that runs SDPA to qforge's attention (qforge.nn.attention, which
    is SDPA but for short CPU training rows); False, leaving the model as it was, when it runs
    another implementation (eager for a reason, flash, flex) or takes no registered function."""
    from ..nn import attention
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    if setter is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        setter(attention.register())
    except (ValueError, ImportError, KeyError):
        return False
    return True
