"""Checkpoint layouts: read a checkpoint under the names the model uses, as transformers does.

Checkpoints often keep an older layout than the model class: Mixtral stores each expert as
`block_sparse_moe.experts.N.w1/w2/w3`, Qwen-MoE and DeepSeek-V3 as `mlp.experts.N.gate_proj/...`,
while transformers 5.x holds the experts as fused 3-D parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]); GPT-NeoX calls its head `embed_out`. transformers
converts at load time with a per-architecture list of transforms (`conversion_mapping.py`:
WeightRenaming renames a key, WeightConverter merges or splits tensors). We run transformers' own
list for the model, never a table of ours, but one target at a time:

    checkpoint keys --rename_source_key--> target key (+ the converter's source pattern)
    read(target)    --  reads that target's sources (a single tensor, or every expert of one
                        layer for a merge), runs the converter's operations, returns the tensor

so host memory holds one tensor, or one expert group, at a time. Keys that name nothing in the
model (bitsandbytes' `weight.absmax`, `weight.quant_state.*` ...) are kept under their own names.

Fused expert parameters are not nn.Linear layers: `place_expert_parameter` is the one place that
puts such a tensor into the model.
"""
from __future__ import annotations

import functools
import re
from copy import deepcopy

import torch
from torch import nn

from ..nn.experts import EXPERT_PARAMETERS, AdaptedExperts, ExpertBank, check_supported, is_fused_experts
from ..quant import QuantState
from .surgery import place_expert_bank, place_quantized_expert


class ConvertedCheckpoint:
    """A `qforge.model.load.Checkpoint` seen through the model's conversion mapping: `keys()`,
    `in`, `read()` and `first_present()` speak the model's parameter names. Build it with
    `convert_checkpoint`, which returns the checkpoint itself when no transform applies."""

    def __init__(self, ckpt, model: nn.Module, renamed: dict[str, str], merged: dict[str, tuple],
                 passthrough: dict[str, str]):
        self.ckpt, self.model, self.folder = ckpt, model, ckpt.folder
        self._renamed = renamed          # target key -> the one source key
        self._merged = merged            # target key -> [converter, [(source key, source pattern)], first target]
        self._passthrough = passthrough  # name -> source key of tensors the model has no parameter for
        self._pending: dict[str, torch.Tensor] = {}  # the other outputs of a one-to-many converter

    def keys(self) -> list[str]:
        return [*self._renamed, *self._merged, *self._passthrough, *self._pending]

    def __contains__(self, key: str) -> bool:
        return key in self._renamed or key in self._merged or key in self._passthrough or key in self._pending

    def nbytes(self) -> int:
        return self.ckpt.nbytes()

    def read(self, key: str) -> torch.Tensor:
        if key in self._pending:
            return self._pending.pop(key)
        if key in self._renamed:
            return self.ckpt.read(self._renamed[key])
        if key in self._merged:
            return self._convert(key)
        if key in self._passthrough:
            return self.ckpt.read(self._passthrough[key])
        raise ValueError(f"tensor '{key}' is missing from the checkpoint in '{self.folder}'")

    def first_present(self, names: list[str]) -> str:
        for name in names:
            if name in self:
                return name
        raise ValueError(f"tensor '{names[0]}' is missing from the checkpoint in '{self.folder}'"
                         + (f" (also looked for {names[1:]})" if len(names) > 1 else ""))

    def _convert(self, key: str) -> torch.Tensor:
        """Run transformers' converter for target `key` on its source tensors, read lazily: the
        converter calls each reader when it materialises its inputs. A converter with several
        outputs (a split) runs once; its other outputs wait in `_pending` until they are read."""
        group = self._merged[key]
        template, sources, first = group
        converter = deepcopy(template)
        for source, pattern in sources:
            converter.add_tensor(first, source, pattern, functools.partial(self.ckpt.read, source))
        try:
            out = converter.convert(first, model=self.model, config=getattr(self.model, "config", None))
        except Exception as exc:  # the ops raise assorted errors on shapes; name what was merged
            raise ValueError(f"'{self.folder}': cannot build '{key}' from {[s for s, _ in sources][:4]}"
                             f"{' ...' if len(sources) > 4 else ''} ({type(exc).__name__}: {exc})") from None
        for name in [n for n, g in self._merged.items() if g is group]:  # every output of this converter
            del self._merged[name]
        for name, value in out.items():
            self._pending[name] = value[0] if isinstance(value, list) else value
        if key not in self._pending:
            raise ValueError(f"'{self.folder}': converting {[s for s, _ in sources][:4]} gave {sorted(out)}, "
                             f"not '{key}'")
        return self._pending.pop(key)


def _transforms(model: nn.Module):
    """(renamings, converters) transformers applies when it loads a checkpoint into `model`, or
    None when this transformers has no conversion mapping (4.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _legacy_rename(model: nn.Module):
    """transformers 4.x: the class attribute `_checkpoint_conversion_mapping` (regex -> replacement)."""
    table = getattr(model, "_checkpoint_conversion_mapping", None) or {}

    def rename(key: str) -> tuple[str, None]:
        for pattern, replacement in table.items():
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        return key, None
    return rename


def convert_checkpoint(ckpt, model: nn.Module):
    """`ckpt` as `model` names its tensors (a ConvertedCheckpoint), or `ckpt` itself when every key
    already is a model name. `model` may be a meta-device skeleton: only its names and config are read."""
    expected = set(model.state_dict().keys())
    transforms = _transforms(model)
    if transforms is not None:
        from transformers.core_model_loading import dot_natural_key, rename_source_key
        renamings, converters = transforms
        prefix = getattr(model, "base_model_prefix", None) or None

        present = dict.fromkeys(expected, True)  # transformers looks names up with .get

        def rename(key: str):
            return rename_source_key(key, renamings, converters, prefix, present)

        def rename_only(key: str) -> str:
            return rename_source_key(key, renamings, [])[0]
        keys = sorted(ckpt.keys(), key=dot_natural_key)  # experts in index order, as transformers stacks them
        by_pattern = {p: c for c in converters for p in c.source_patterns}
    else:
        rename, keys, by_pattern = _legacy_rename(model), sorted(ckpt.keys()), {}

        def rename_only(key: str) -> str:
            return rename(key)[0]

    renamed, merged, passthrough = {}, {}, {}
    for key in keys:
        target, pattern = rename(key)
        if target not in expected and key in expected:  # a rename that leads nowhere: keep the key
            target, pattern = key, None
        if target not in expected:  # e.g. bitsandbytes' `weight.absmax`: renamed as its weight is
            passthrough[rename_only(key)] = key
        elif pattern is None:
            if target in renamed:
                raise ValueError(f"checkpoint in '{ckpt.folder}': both '{renamed[target]}' and '{key}' "
                                 f"would load into '{target}'")
            renamed[target] = key
        else:
            if target not in merged:
                converter = by_pattern[pattern]
                group = [converter, [], target]
                first = converter.target_patterns[0]  # a split names its outputs after the first target
                for other in converter.target_patterns:
                    merged[target.replace(first, other)] = group
            merged[target][1].append((key, pattern))
    if not merged and all(target == key for target, key in [*renamed.items(), *passthrough.items()]):
        return ckpt
    return ConvertedCheckpoint(ckpt, model, renamed, merged, passthrough)


# ---- fused expert parameters --------------------------------------------------------------------
def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the fused expert parameters: 3-D float parameters [experts, out, in] of a module
    that holds a bank of experts (it has `num_experts`), e.g. `mlp.experts.gate_up_proj`."""
    names = []
    for module_name, module in model.named_modules():
        if not hasattr(module, "num_experts"):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                names.append(f"{module_name}.{leaf}" if module_name else leaf)
    return names


def router_linear_names(model: nn.Module) -> list[str]:
    """nn.Linear routers and gates of MoE blocks (Phi-MoE's `router`, Qwen2-MoE's
    `shared_expert_gate`): Linear layers that sit beside an expert bank in the same block. They
    stay dense and are not LoRA targets, as bitsandbytes + PEFT users keep them."""
    names = []
    for block_name, block in model.named_modules():
        children = dict(block.named_children())
        if not any(hasattr(child, "num_experts") and any(p.dim() == 3 for p in child.parameters(recurse=False))
                   for child in children.values()):
            continue
        names += [f"{block_name}.{leaf}" if block_name else leaf
                  for leaf, child in children.items() if isinstance(child, nn.Linear)]
    return names


def place_expert_parameter(model: nn.Module, name: str, tensor: torch.Tensor, compute_dtype: torch.dtype,
                           device: torch.device, quant: dict | None = None) -> None:
    """Put fused expert tensor `name` ([experts, out, in], one expert group as read from the
    checkpoint) into the model on `device`.

    With `quant` (quant_type nf4/fp4, blocksize, double_quant) the parameter becomes a 4-bit expert
    bank (qforge.nn.experts, each expert quantised as bitsandbytes quantises a weight); without it,
    or for a quant type experts do not take (HQQ), it stays dense in `compute_dtype`, frozen."""
    if quant is not None and quant.get("quant_type") in ("nf4", "fp4") and takes_4bit_experts(model, name):
        place_quantized_expert(model, name, tensor.to(device), quant["quant_type"], quant["blocksize"],
                               quant["double_quant"], compute_dtype)
        return
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    expected = tuple(getattr(module, leaf).shape)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor '{name}' has shape {list(tensor.shape)}, the model expects {list(expected)}")
    param = nn.Parameter(tensor.to(device).to(compute_dtype), requires_grad=False)
    param._is_hf_initialized = True
    module._parameters[leaf] = param


def stored_expert_bank(ckpt, name: str, device: torch.device | str = "cpu") -> ExpertBank | None:
    """The 4-bit bank of fused expert parameter `name` when the folder stores it so (a qforge 4-bit
    folder: expert e under `{name}.{e}` in bitsandbytes' keys of one weight), else None."""
    if f"{name}.0" not in ckpt:
        return None
    keys = [k for k in ckpt.keys() if k.startswith(name + ".")]
    states, e = [], 0
    while f"{name}.{e}" in ckpt:
        prefix = f"{name}.{e}"
        try:
            states.append(QuantState.from_state_dict({k: ckpt.read(k).to(device) for k in keys
                                                      if k == prefix or k.startswith(prefix + ".")}, prefix))
        except ValueError as exc:
            raise ValueError(f"'{ckpt.folder}': expert {e} of '{name}': {exc}") from None
        e += 1
    return ExpertBank.from_states(states)


def takes_4bit_experts(model: nn.Module, name: str) -> bool:
    """Whether fused expert parameter `name` can live in qforge's 4-bit experts (gate_up_proj /
    down_proj of a layout AdaptedExperts computes); others (e.g. GraniteMoE's input_linear) stay dense."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf not in EXPERT_PARAMETERS:
        return False
    if isinstance(module, AdaptedExperts):
        return True
    try:
        check_supported(module)
    except ValueError:
        return False
    return is_fused_experts(module)
