"""Save and load adapters in PEFT 0.21's on-disk format, so PEFT and qforge read each other's files.

A folder holds two files:
  adapter_config.json          LoraConfig's fields (PEFT writes every field, defaults included)
  adapter_model.safetensors    base_model.model.<module>.lora_A.weight   [r, in]
                               base_model.model.<module>.lora_B.weight   [out, r]
                               base_model.model.<module>.lora_magnitude_vector [out]   (DoRA)
  and for LoRA on 4-bit MoE experts (PEFT's `target_parameters`, e.g. ["experts.gate_up_proj",
  "experts.down_proj"]): per fused expert parameter [E, out, in] of module <experts>,
                               base_model.model.<experts>[.base_layer].lora_A.weight  [E*r, in]
                               base_model.model.<experts>[.base_layer].lora_B.weight  [out, r*E]
  PEFT wraps one parameter per ParamWrapper and nests them in the module's parameter order, so
  gate_up_proj's keys carry one `.base_layer` when down_proj is targeted too (see
  qforge.nn.experts for the per-expert order inside A and B).

`target_modules` is written as PEFT writes it: the list of leaf names it was given
(["q_proj", "v_proj"]), or, for "all-linear", the full path of every adapted layer (PEFT expands
the shorthand before saving). Folders are written atomically: a temporary sibling folder is
filled, fsynced and renamed into place.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..fileio import CorruptFile, atomic_folder, read_json
from ..model.surgery import adapted_layers, expert_layers, names_experts, set_active_adapter
from ..nn import AdaptedLinear, LoraAdapter, LoraSpec
from ..nn.experts import ExpertLora
from .model_card import model_card, portable_base_id

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files these match

# Every field PEFT 0.21.2's LoraConfig.to_dict() writes, at its default (as save_pretrained writes it).
# PEFT warns about keys it does not know, so nothing of qforge's own goes in here.
PEFT_LORA_DEFAULTS: dict = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}
# Config fields that change what an adapter computes in ways qforge does not implement: a file that
# sets one of them is refused rather than loaded into something different.
_UNSUPPORTED = ("modules_to_save", "layers_to_transform", "layer_replication", "target_parameters",
                "trainable_token_indices", "alora_invocation_tokens", "use_bdlora", "fan_in_fan_out", "lora_bias",
                "use_qalora", "arrow_config")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector(?:\.weight)?)$")


def write_folder_atomically(out_dir: str | Path, write: Callable[[Path], None],
                            markers: tuple[str, ...] = (CONFIG_NAME, "config.json")) -> Path:
    """qforge.fileio.atomic_folder, refusing to replace a folder that holds none of `markers`."""
    return atomic_folder(out_dir, write, markers)


# ---- save -----------------------------------------------------------------------------------
def layer_adapters(model: nn.Module, name: str, allow_none: bool = False) -> dict[str, LoraAdapter]:
    """Module path -> adapter `name` of every adapted linear layer carrying it; ValueError when none
    does (unless allow_none: an adapter on experts only)."""
    found = {n: layer.adapters[name] for n, layer in adapted_layers(model) if name in layer.adapters}
    if not found and not allow_none:
        have = sorted({a for _, layer in adapted_layers(model) for a in layer.adapters})
        raise ValueError(f"no layer of the model carries an adapter named '{name}'; adapters present: {have}")
    return found


def _hyper(adapter: LoraAdapter) -> tuple[int, float, float, bool, bool]:
    """(r, alpha, dropout, use_rslora, use_dora) of one adapter, from the LoraSpec it was built with."""
    spec = adapter.spec
    r, alpha, dropout, rslora, dora = spec.r, spec.alpha, spec.dropout, spec.use_rslora, spec.use_dora
    alpha = int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else float(alpha)  # 16, as PEFT writes it
    return r, alpha, float(dropout), rslora, dora


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own linear layers (nn.Linear or AdaptedLinear), by path; not the adapters'
    lora_A / lora_B, which are nn.Linear too but live inside an AdaptedLinear."""
    inner = tuple(f"{n}." for n, _ in adapted_layers(model))
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, AdaptedLinear)) and not (inner and n.startswith(inner))}


def _output_layer(model: nn.Module) -> str | None:
    """Module path of the output embedding (lm_head), which "all-linear" leaves out."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is out_emb), None) if out_emb is not None else None


def _target_modules(model: nn.Module, adapted: list[str], spec_targets) -> list[str]:
    """What PEFT writes: for "all-linear", the full path of every adapted layer (PEFT expands the
    shorthand); for a list, its leaf names."""
    linears = list(base_linears(model))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    if spec_targets != "all-linear" and sorted(n for n in linears if n.rsplit(".", 1)[-1] in leaves) == sorted(adapted):
        return leaves
    return sorted(adapted)


def adapter_config(model: nn.Module, name: str = "default", base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json dict PEFT 0.21 would write for adapter `name` of `model`. Layers whose
    rank or alpha differ from the most common one go to rank_pattern / alpha_pattern (full paths)."""
    experts = expert_adapters(model, name)
    adapters = layer_adapters(model, name, allow_none=bool(experts))
    expert_hyper = {f"{m}.{p}": _hyper(a) for m, loras in experts.items() for p, a in loras.items()}
    hyper = {n: _hyper(a) for n, a in adapters.items()}
    r, alpha, dropout, rslora, dora = Counter((hyper or expert_hyper).values()).most_common(1)[0][0]
    if len({h[2:] for h in hyper.values()}) > 1:
        raise ValueError(f"adapter '{name}' mixes dropout / rsLoRA / DoRA settings across layers; "
                         "PEFT's format holds one setting per adapter")
    odd = sorted(p for p, h in expert_hyper.items() if h[3] != rslora)
    if odd:
        raise ValueError(f"adapter '{name}': expert parameters {odd[:3]} have another rsLoRA setting than the "
                         "linear layers; PEFT's format holds one setting per adapter")
    hyper.update(expert_hyper)  # their own rank / alpha go to the patterns, keyed by the parameter's path
    if experts:
        # PEFT's ParamWrapper refuses lora_dropout != 0; dropout only acts in training, so the file
        # says 0 and loads in PEFT with the same outputs (the linear layers trained with `dropout`)
        dropout = 0.0
    spec_targets = next(iter(adapters.values())).spec.target_modules if adapters else "all-linear"
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    base_model_name_or_path = portable_base_id(base_model_name_or_path)  # a Hub id or an absolute path
    return {**PEFT_LORA_DEFAULTS,
            "base_model_name_or_path": base_model_name_or_path, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "use_rslora": rslora, "use_dora": dora,
            "target_modules": _target_modules(model, list(adapters), spec_targets),
            "target_parameters": sorted({f"{m.rsplit('.', 1)[-1]}.{p}" for m, loras in experts.items()
                                         for p in loras}) or None,
            "rank_pattern": {n: h[0] for n, h in hyper.items() if h[0] != r},
            "alpha_pattern": {n: h[1] for n, h in hyper.items() if h[1] != alpha}}


def adapter_tensors(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's tensor keys -> contiguous copies of adapter `name`'s weights (in the adapter's dtype)."""
    out = {}
    experts = expert_adapters(model, name)
    for module, a in layer_adapters(model, name, allow_none=bool(experts)).items():
        for suffix, t in a.peft_weights().items():  # lora_A [r, in], lora_B [out, r], DoRA's magnitude [out]
            out[f"{PREFIX}{module}.{suffix}"] = t.detach().contiguous().clone()
    for module, loras in experts.items():
        for path, p in _expert_key_paths(module, list(loras)).items():
            for suffix, t in loras[p].peft_factors().items():  # lora_A [E*r, in], lora_B [out, r*E]
                out[f"{PREFIX}{path}.{suffix}"] = t.contiguous().clone()
    return out


def expert_adapters(model: nn.Module, name: str) -> dict[str, nn.ModuleDict]:
    """experts module path -> {parameter name: ExpertLora} of adapter `name`."""
    return {n: layer.adapters[name] for n, layer in expert_layers(model) if name in layer.adapters}


def _expert_key_paths(module: str, params: list[str]) -> dict[str, str]:
    """PEFT's module path -> targeted expert parameter, for the parameters p_0..p_k-1 in the module's
    order: p_i's ParamWrapper is nested k-1-i levels deep (one `.base_layer` each)."""
    return {module + ".base_layer" * (len(params) - 1 - i): p for i, p in enumerate(params)}


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default",
                 base_model_name_or_path: str | None = None, tokenizer=None) -> Path:
    """Write adapter `name` of `model` as a PEFT folder (adapter_config.json + adapter_model.safetensors)
    that `PeftModel.from_pretrained(base, out_dir)` loads without warnings, and beside them the base
    it sits on (qforge_base.json, qforge.adapters.base_record). Returns the folder.
    With `tokenizer`, its files (chat template included) are written beside the adapter."""
    from .base_record import describe_base, write_base_record

    config = adapter_config(model, name, base_model_name_or_path)
    tensors = {k: v.cpu() for k, v in adapter_tensors(model, name).items()}
    base = describe_base(model)  # the base it was trained on, for servers to compare (qforge_base.json)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if base is not None:
            write_base_record(tmp, base)
        if tokenizer is not None:
            from ..model.checkpoint import save_tokenizer
            save_tokenizer(tokenizer, tmp, getattr(model, "generation_config", None))
        (tmp / "README.md").write_text(model_card(config["base_model_name_or_path"], config))

    return write_folder_atomically(out_dir, write)


# ---- load -----------------------------------------------------------------------------------
def read_adapter_config(adapter_dir: str | Path, experts: bool = False) -> dict:
    """adapter_config.json as a dict; FileNotFoundError / ValueError naming the file and the problem.
    `experts`: accept target_parameters that name MoE expert parameters (load_adapter reads them;
    the multi-adapter server does not)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter folder '{adapter_dir}' does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing: not a PEFT adapter folder")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"'{path}' must hold a JSON object, found {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"'{path}': peft_type is {config.get('peft_type')!r}; qforge loads only 'LORA' adapters")
    params = config.get("target_parameters") if experts else None
    if params is not None:
        if not isinstance(params, list) or not all(isinstance(p, str) and names_experts(p) for p in params):
            raise ValueError(f"'{path}': target_parameters = {params!r}: qforge adapts only MoE expert parameters "
                             "(entries ending in 'experts.gate_up_proj' or 'experts.down_proj')")
        config = {**config, "target_modules": config.get("target_modules") or []}
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise ValueError(f"'{path}': required field '{key}' is missing")
    for key in _UNSUPPORTED:
        if key == "target_parameters" and params is not None:
            continue
        if key == "target_parameters" and config.get(key):
            raise ValueError(f"'{path}': target_parameters = {config[key]!r} (LoRA on MoE expert parameters) is "
                             "not supported here: qforge reads such adapters with load_adapter (training, merge) "
                             "and read_served_adapter (the multi-adapter server), not in the GGUF LoRA export")
        if config.get(key) not in (None, False, [], {}):
            raise ValueError(f"'{path}': {key} = {config[key]!r} is not supported by qforge")
    if config.get("bias", "none") != "none":
        raise ValueError(f"'{path}': bias = {config['bias']!r} is not supported by qforge (only 'none')")
    return config


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"lora_A": [r, in], "lora_B": [out, r], "magnitude": [out]} from the weights file."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing (qforge reads PEFT's safetensors format only)")
    parts = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
             "lora_magnitude_vector.weight": "magnitude"}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise ValueError(f"'{path}': unexpected tensor key '{key}' (not a LoRA / DoRA weight)")
                modules.setdefault(m["module"], {})[parts[m["part"]]] = f.get_tensor(key)
    except (OSError, RuntimeError, SafetensorError) as exc:  # a truncated or foreign file
        raise CorruptFile(path, f"not a readable safetensors file ({str(exc)[:200]})") from exc
    return modules


def _match_targets(config: dict, names: list[str], output_layer: str | None) -> list[str]:
    """The module names PEFT would adapt: a string target is a regex over the full name (or the
    "all-linear" shorthand), a list matches a full name or a '.'-separated suffix."""
    targets, exclude = config["target_modules"], config.get("exclude_modules")

    def excluded(n: str) -> bool:
        if not exclude:
            return False
        if isinstance(exclude, str):
            return re.fullmatch(exclude, n) is not None
        return n in exclude or any(n.endswith("." + e) for e in exclude)

    if isinstance(targets, str):
        hit = (lambda n: n != output_layer) if targets.lower() == "all-linear" else \
            (lambda n: re.fullmatch(targets, n) is not None)
    else:
        hit = lambda n: n in targets or any(n.endswith("." + t) for t in targets)  # noqa: E731
    return [n for n in names if hit(n) and not excluded(n)]


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layer_spec(config: dict, module: str, dtype: torch.dtype) -> LoraSpec:
    return LoraSpec(r=int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"])),
                    alpha=float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])),
                    dropout=float(config.get("lora_dropout") or 0.0), target_modules=config["target_modules"],
                    use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
                    dtype=dtype, modules_to_skip=[])


def _check_shapes(path: Path, module: str, layer: AdaptedLinear, spec: LoraSpec, t: dict) -> None:
    out_f, in_f, r = layer.out_features, layer.in_features, spec.r
    want = {"lora_A": [r, in_f], "lora_B": [out_f, r], **{attr: [out_f] for attr in spec.variant.extra_weights}}
    for part, shape in want.items():
        if part not in t:
            raise ValueError(f"'{path}': layer '{module}' has no {part} tensor")
        if list(t[part].shape) != shape:
            raise ValueError(f"'{path}': layer '{module}' {part} has shape {list(t[part].shape)}, but the base layer "
                             f"[out={out_f}, in={in_f}] with r={r} needs {shape}")
    if not spec.use_dora and "magnitude" in t:
        raise ValueError(f"'{path}': layer '{module}' has a DoRA magnitude but use_dora is false")


class ModelLayout(NamedTuple):
    """What reading an adapter needs to know of a model: its module paths, its own linear layers
    by path, and the output layer's path. Taken once (model_layout) it stays valid while the
    model's layers are wrapped for serving."""
    modules: frozenset
    linears: dict
    output_layer: str | None


def model_layout(model: nn.Module) -> ModelLayout:
    return ModelLayout(frozenset(n for n, _ in model.named_modules()), base_linears(model), _output_layer(model))


def _plan(layout: ModelLayout, adapter_dir: Path, config: dict, tensors: dict, name: str,
          dtype: torch.dtype | None) -> list[tuple[str, AdaptedLinear, LoraSpec, dict]]:
    """Check everything before touching the model: which layers, their specs, their tensors."""
    linears = list(layout.linears)
    wanted = _match_targets(config, linears, layout.output_layer)
    weights_path = adapter_dir / WEIGHTS_NAME
    missing = sorted(set(tensors) - layout.modules)
    if missing:
        raise ValueError(f"'{weights_path}' holds weights for modules the base model does not have: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; is this adapter for another model?")
    if not wanted:
        leaves = sorted({n.rsplit('.', 1)[-1] for n in linears})
        raise ValueError(f"'{adapter_dir / CONFIG_NAME}': target_modules {config['target_modules']!r} match no linear "
                         f"layer of the base model; its linear layers are {leaves}")
    if sorted(wanted) != sorted(tensors):
        only_cfg, only_file = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
        raise ValueError(f"'{adapter_dir}': target_modules and the weights disagree: targeted without weights "
                         f"{only_cfg[:5]}, weights without a target {only_file[:5]}")
    plan = []
    for module in wanted:
        layer = layout.linears[module]
        if not isinstance(layer, AdaptedLinear):
            raise ValueError(f"layer '{module}' is a {type(layer).__name__}, not an adapter layer (AdaptedLinear); "
                             "quantise the base before loading an adapter onto it")
        if name in layer.adapters:
            raise ValueError(f"layer '{module}' already has an adapter named '{name}'; pass another name")
        t = tensors[module]
        spec = _layer_spec(config, module, dtype or t["lora_A"].dtype)
        _check_shapes(weights_path, module, layer, spec, t)
        plan.append((module, layer, spec, t))
    return plan


def default_adapter_name(adapter_dir: str | Path) -> str:
    """The folder's name when it can key a ModuleDict (no '.', not empty), else "default"."""
    folder = Path(adapter_dir).absolute().name
    return folder if folder and "." not in folder else "default"


def read_adapter(model: nn.Module | ModelLayout, adapter_dir: str | Path, name: str | None = None,
                 dtype: torch.dtype | None = None) -> tuple[str, list[tuple[str, AdaptedLinear, LoraSpec, dict]]]:
    """Read and check the PEFT adapter in `adapter_dir` against `model` without changing the model:
    (name, [(module path, layer, spec, {"lora_A", "lora_B", and the variant's weights})]). Missing
    files are a FileNotFoundError; malformed JSON, unsupported settings, targets the base lacks and
    shapes that do not fit are a ValueError naming the file, the layer and both shapes."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = read_adapter_tensors(adapter_dir)
    name = name or default_adapter_name(adapter_dir)
    layout = model if isinstance(model, ModelLayout) else model_layout(model)
    return name, _plan(layout, adapter_dir, config, tensors, name, dtype)


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str | None = None,
                 dtype: torch.dtype | None = None) -> str:
    """Attach the PEFT adapter in `adapter_dir` to the adapter layers of `model` as adapter `name`
    (default: the folder's name, or "default") and make it active. Weights keep the file's dtype
    unless `dtype` is given. Nothing is changed when a check fails (read_adapter). Returns the name."""
    if read_adapter_config(adapter_dir, experts=True).get("target_parameters"):
        return _load_with_experts(model, Path(adapter_dir), name, dtype)
    name, plan = read_adapter(model, adapter_dir, name, dtype)
    _attach(plan, name)
    set_active_adapter(model, name)
    return name


def _attach(plan, name: str) -> None:
    for _, layer, spec, t in plan:
        adapter = layer.add_adapter(name, spec)
        with torch.no_grad():
            adapter.lora_A.weight.copy_(t["lora_A"])
            adapter.lora_B.weight.copy_(t["lora_B"])
            for attr in spec.variant.extra_weights:
                getattr(adapter, attr).copy_(t[attr])


def _plan_experts(model: nn.Module, adapter_dir: Path, config: dict, tensors: dict, name: str,
                  dtype: torch.dtype | None) -> list[tuple[object, str, tuple, dict, dict]]:
    """Check the expert part of an adapter (target_parameters) against the model's 4-bit experts
    modules; takes (pops) its tensors out of `tensors`. [(module, path, params, {param: spec},
    {param: tensors})]."""
    weights_path = adapter_dir / WEIGHTS_NAME
    entries = config["target_parameters"]
    if config.get("use_dora"):
        raise ValueError(f"'{adapter_dir / CONFIG_NAME}': use_dora with target_parameters: DoRA on expert "
                         "parameters is not supported (nor by PEFT)")
    plan = []
    for module_name, module in expert_layers(model):
        params = tuple(p for p in module.parameter_order
                       if any(f"{module_name}.{p}" == w or f"{module_name}.{p}".endswith("." + w) for w in entries))
        if not params:
            continue
        if name in module.adapters:
            raise ValueError(f"layer '{module_name}' already has an adapter named '{name}'; pass another name")
        found, specs = {}, {}
        for path, p in _expert_key_paths(module_name, list(params)).items():
            t = tensors.pop(path, None)
            if t is None or "lora_A" not in t or "lora_B" not in t:
                raise ValueError(f"'{weights_path}': expert parameter '{module_name}.{p}' is targeted but "
                                 f"'{PREFIX}{path}.lora_A.weight' / '.lora_B.weight' are missing")
            spec = specs[p] = _layer_spec({**config, "lora_dropout": 0.0}, f"{module_name}.{p}",
                                          dtype or t["lora_A"].dtype)
            E, out_f, in_f = module.expected_shape(p)
            want = {"lora_A": [E * spec.r, in_f], "lora_B": [out_f, spec.r * E]}
            for part, shape in want.items():
                if list(t[part].shape) != shape:
                    raise ValueError(f"'{weights_path}': expert parameter '{module_name}.{p}' {part} has shape "
                                     f"{list(t[part].shape)}, but [{E} experts, out={out_f}, in={in_f}] with "
                                     f"r={spec.r} needs {shape}")
            found[p] = t
        plan.append((module, module_name, params, specs, found))
    if not plan:
        raise ValueError(f"'{adapter_dir / CONFIG_NAME}': target_parameters {entries!r} match no 4-bit experts "
                         "module of the base model (quantize_experts first)")
    return plan


def read_served_adapter(model: nn.Module, layout: ModelLayout, adapter_dir: str | Path, name: str,
                        dtype: torch.dtype | None = None) -> tuple[list, dict[str, nn.ModuleDict]]:
    """read_adapter for the multi-adapter server, expert adapters (target_parameters) included, without
    changing the model: (read_adapter's plan of linear layers, {experts module path: ModuleDict(parameter
    name -> ExpertLora)}), the expert LoRAs built apart from the model (the server copies them into slots)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir, experts=True)
    if not config.get("target_parameters"):
        return read_adapter(layout, adapter_dir, name, dtype)[1], {}
    tensors = read_adapter_tensors(adapter_dir)
    experts = {}
    for module, path, params, specs, found in _plan_experts(model, adapter_dir, config, tensors, name, dtype):
        loras = nn.ModuleDict()
        for p in params:
            E, out_f, in_f = module.expected_shape(p)
            loras[p] = ExpertLora(E, in_f, out_f, specs[p]).to(next(iter(module.buffers())).device)
            with torch.no_grad():
                loras[p].from_peft_factors(found[p]["lora_A"], found[p]["lora_B"])
        experts[path] = loras
    plan = _plan(layout, adapter_dir, config, tensors, name, dtype) if config["target_modules"] or tensors else []
    return plan, experts


def _load_with_experts(model: nn.Module, adapter_dir: Path, name: str | None, dtype: torch.dtype | None) -> str:
    """load_adapter for a file with target_parameters: the expert part, then the linear part."""
    config = read_adapter_config(adapter_dir, experts=True)
    tensors = read_adapter_tensors(adapter_dir)
    name = name or default_adapter_name(adapter_dir)
    expert_plan = _plan_experts(model, adapter_dir, config, tensors, name, dtype)
    plan = []
    if config["target_modules"] or tensors:
        plan = _plan(model_layout(model), adapter_dir, config, tensors, name, dtype)
    _attach(plan, name)
    for module, _, params, specs, found in expert_plan:
        loras = module.add_adapter(name, specs, params)
        for p, t in found.items():
            loras[p].from_peft_factors(t["lora_A"], t["lora_B"])
    set_active_adapter(model, name)
    return name


__all__ = ["layer_adapters", "expert_adapters", "save_adapter", "load_adapter", "read_adapter", "read_served_adapter", "adapter_config", "adapter_tensors", "read_adapter_config",
           "read_adapter_tensors", "write_folder_atomically", "model_layout", "ModelLayout", "default_adapter_name", "PEFT_LORA_DEFAULTS"]
