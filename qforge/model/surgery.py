"""Layer surgery on a transformers model: swap target nn.Linear layers for AdaptedLinear (over a
4-bit or dense base) and fused MoE expert modules for AdaptedExperts (4-bit per expert), attach and
select adapters, and prepare the model for k-bit training. The model class itself is untouched."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..nn import AdaptedLinear, LoraSpec
from ..nn.experts import EXPERT_PARAMETERS, ExpertBank, AdaptedExperts, is_fused_experts

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
    unknown = sorted(w for w in set(wanted) - leaves if not names_experts(w))  # experts: see expert_targets
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
    """Attach adapter `name` to every AdaptedLinear and 4-bit expert parameter the spec targets
    (expert_targets) and make it active."""
    layers = dict(adapted_layers(model))
    for layer_name in select_targets(list(layers), spec.target_modules, spec.modules_to_skip):
        layers[layer_name].add_adapter(name, spec)
    for experts_name, params in expert_targets(model, spec.target_modules).items():
        model.get_submodule(experts_name).add_adapter(name, spec, params)
    set_active_adapter(model, name)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    for _, layer in [*adapted_layers(model), *expert_layers(model)]:
        layer.active_adapter = name if name in layer.adapters else None


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every adapter layer of the model (and stop it being active)."""
    for _, layer in [*adapted_layers(model), *expert_layers(model)]:
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


def use_float32_residual(model: nn.Module) -> None:
    """A float32 residual stream under bf16 autocast, computing what PEFT's
    prepare_model_for_kbit_training gives a k-bit model: the hidden states start in float32 (the
    input embeddings' output is cast to float32: the same values as PEFT's upcast matrix, without a
    float32 copy of a 16-bit one; a matrix stored in float32 was read so by the loader), the norms
    in float32 keep them so, and every adapted layer gets the one float32-residual switch
    (AdaptedLinear.keep_input_dtype, read in its forward only): it returns its float32 input's
    dtype, its base output (product + bias) and its variant's term (LoRA's low-rank term, DoRA's)
    added in float32. The products themselves stay in the compute dtype (autocast), and with float32
    hidden states the rotary cos/sin reach attention in float32 as in PEFT's run. The LM head is left
    as it is: autocast computes it in BF16 from either dtype, so upcasting it (as PEFT's recipe does)
    would cost memory and change no value. Nothing is upcast but the norms' vectors."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        float32_output(emb)
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
        elif isinstance(module, AdaptedLinear):
            module.keep_input_dtype = True


def float32_output(module: nn.Module) -> None:
    """Cast `module`'s floating output to float32 (once per module): where the float32 residual
    stream starts."""
    if getattr(module, "_qforge_float32_output", False):
        return

    def to_float32(_module, _inputs, output):
        return output.float() if torch.is_tensor(output) and output.is_floating_point() else output

    module.register_forward_hook(to_float32)
    module._qforge_float32_output = True


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


# ---- mixture-of-experts: fused 3-D expert parameters in 4 bits ---------------------------------
def names_experts(target: str) -> bool:
    """Whether a target_modules entry names expert parameters: "experts" (both parameters of every
    fused-experts module) or a path ending in "experts.gate_up_proj" / "experts.down_proj" (a
    bare "down_proj" names linear layers only, as in PEFT's target_modules)."""
    parts = target.split(".")
    return target == "experts" or (len(parts) >= 2 and parts[-1] in EXPERT_PARAMETERS and parts[-2] == "experts")


def expert_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedExperts]]:
    """(name, module) of every experts module qforge adapts (AdaptedExperts: 4-bit or dense banks)."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedExperts):
            yield name, module


def expert_targets(model: nn.Module, target_modules: str | list[str]) -> dict[str, tuple[str, ...]]:
    """AdaptedExperts module name -> the expert parameters `target_modules` adapts: every one for
    "all-linear" (the default: all linear layers + experts), else those named per names_experts.
    A ValueError when the list names experts but the model has no AdaptedExperts module."""
    layers = [n for n, _ in expert_layers(model)]
    if target_modules == "all-linear":
        return {n: EXPERT_PARAMETERS for n in layers}
    wanted = [w for w in ([target_modules] if isinstance(target_modules, str) else target_modules) if names_experts(w)]
    if not wanted:
        return {}
    if not layers:
        raise ValueError(f"target_modules {wanted} name expert parameters, but the model has no adapted experts "
                         "module (quantize_experts or dense_lora_experts first)")
    out = {}
    for n in layers:
        params = tuple(p for p in EXPERT_PARAMETERS
                       if any(w == "experts" or f"{n}.{p}" == w or f"{n}.{p}".endswith("." + w) for w in wanted))
        if params:
            out[n] = params
    return out


def quantize_experts(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every fused-experts module (transformers' 3-D gate_up_proj / down_proj) by a
    AdaptedExperts holding both parameters in 4 bits per expert, one module at a time. The router
    (the MoE block's `gate`) is not touched: it stays as it is, frozen by prepare_for_kbit_training.
    Returns the replaced modules' names."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        experts = model.get_submodule(name)
        set_module(model, name, AdaptedExperts.quantized(experts, quant_type, blocksize, double_quant, compute_dtype))
        del experts
    return names


def dense_lora_experts(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every fused-experts module by an AdaptedExperts over its weights kept dense and frozen
    in `compute_dtype` (BF16 LoRA on experts, the counterpart of dense_lora_linears). Returns the names."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        set_module(model, name, AdaptedExperts.dense(model.get_submodule(name), compute_dtype))
    return names


def quantize_expert_tensor(tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                           double_quant: bool = True) -> ExpertBank:
    """One fused expert parameter [E, out, in] (as a streaming loader reads it) -> its 4-bit bank,
    each expert quantised as bitsandbytes' quantize_4bit would quantise that slice."""
    return ExpertBank.quantize(tensor, quant_type, blocksize, double_quant)


def _experts_module(model: nn.Module, name: str, compute_dtype: torch.dtype) -> tuple[AdaptedExperts, str]:
    """The AdaptedExperts holding fused expert parameter `name` (the transformers experts module, whose
    own parameters may be on the meta device, becomes one on the first of its two parameters) and the
    parameter's leaf name. ValueError for a name that is not a fused expert parameter."""
    parent, _, pname = name.rpartition(".")
    if pname not in EXPERT_PARAMETERS:
        raise ValueError(f"'{name}' is not a fused expert parameter (expected one of {EXPERT_PARAMETERS})")
    module = model.get_submodule(parent)
    if not isinstance(module, AdaptedExperts):
        if not is_fused_experts(module):
            raise ValueError(f"'{parent}' is a {type(module).__name__}, not a fused-experts module")
        module = AdaptedExperts.like(module, compute_dtype)
        set_module(model, parent, module)
    return module, pname


def place_expert_bank(model: nn.Module, name: str, bank, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Put a ready bank (4-bit, or dense) for fused expert parameter `name` into the model."""
    module, pname = _experts_module(model, name, compute_dtype)
    module.set_bank(pname, bank)


def place_quantized_expert(model: nn.Module, name: str, tensor: torch.Tensor, quant_type: str = "nf4",
                           blocksize: int = 64, double_quant: bool = True,
                           compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Put the fused expert parameter `name` (e.g. "model.layers.0.mlp.experts.gate_up_proj",
    tensor [E, out, in]) into the model in 4 bits; each call quantises only its own tensor.
    ValueError for another name or shape."""
    module, pname = _experts_module(model, name, compute_dtype)
    if tuple(tensor.shape) != module.expected_shape(pname):
        raise ValueError(f"tensor '{name}' has shape {list(tensor.shape)}, expected "
                         f"{list(module.expected_shape(pname))}")
    module.set_bank(pname, quantize_expert_tensor(tensor, quant_type, blocksize, double_quant))
