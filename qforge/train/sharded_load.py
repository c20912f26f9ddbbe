"""A run of several processes loads its model sharded (qforge.dist.load): each rank reads and
quantises the model block by block and keeps only its shard of each, so no rank ever holds the
whole 4-bit model. The training set-up that `load_for_method` applies to the whole model is split
in three, applied where each part's tensors exist:

    the meta skeleton   the model-wide switches (run._setup_training_switches: checkpointing,
                        the input-gradient hook, attention, use_cache) -- attributes and hooks only
    each whole block    its adapters (fresh: the order of a one-process run, so the same initial
                        values from the same seed), what is trainable, norms in float32, the
                        float32-residual switch of its layers
    the rest            the same for the embeddings, final norm and output layer

A continued adapter (--adapter), a reference adapter, LoftQ, HQQ, GGUF sources and MoE models
load whole and are sharded after (run.shard_for_group), as before.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dist import Group
from .config import TrainConfig


def why_not_sharded(cfg: TrainConfig) -> str | None:
    """Why `cfg` loads whole before sharding (None: it loads sharded)."""
    if cfg.method != "qlora":
        return f"method {cfg.method}"
    if cfg.loftq_iters > 0:
        return "LoftQ initialises adapters from the whole dense model"
    if cfg.adapter is not None or cfg.ref_adapter is not None:
        return "a continued or reference adapter is attached to the whole model"
    if cfg.quant_type not in ("nf4", "fp4"):
        return f"quant_type {cfg.quant_type}"
    return None


def load_sharded_for_method(cfg: TrainConfig, group: Group, log=print):
    """(model, tokenizer, (trainable, total) parameters, sharding figures) with every rank holding
    its shard, or None (logged) when this run loads whole and is sharded after."""
    from ..dist.load import LoadMeter, NotShardable, load_sharded
    from .run import _keep_float32

    why = why_not_sharded(cfg)
    if why is None:
        torch.manual_seed(cfg.seed)  # the adapters' initial values, as load_for_method draws them
        meter, switches = LoadMeter(), _Switches(cfg, group)
        try:
            model, tok = load_sharded(cfg.model, group, {"quant_type": cfg.quant_type, "blocksize": 64,
                                                         "double_quant": cfg.double_quant},
                                      getattr(torch, cfg.compute_dtype), getattr(torch, cfg.compute_dtype),
                                      cfg.target_modules, _keep_float32(cfg), cfg.revision,
                                      switches.skeleton, switches.block, switches.root, meter)
        except NotShardable as exc:
            why = str(exc)
    if why is not None:
        log(f"loading the whole model on every rank, then sharding it: {why}")
        return None
    _finish_tokenizer(tok, cfg)
    return model, tok, (meter.trainable, meter.total), _sharding_figures(model, group, meter, log)


class _Switches:
    """The three parts of load_for_method's training set-up (see the module's docstring)."""

    def __init__(self, cfg: TrainConfig, group: Group):
        self.cfg, self.group, self.device, self.use_cache = cfg, group, group.device, None

    def skeleton(self, model: nn.Module) -> None:
        from .run import _setup_training_switches
        _setup_training_switches(model, self.cfg, self.device)  # on meta tensors: flags and hooks
        self.use_cache = model.config.use_cache

    def block(self, block: nn.Module) -> None:
        from ..model import surgery
        from .run import lora_spec
        surgery.add_adapter(block, "default", lora_spec(self.cfg))
        surgery.prepare_for_kbit_training(block, gradient_checkpointing=False)  # trainable, norms
        if self.cfg.residual_dtype == "float32":
            surgery.use_float32_residual(block)
        self.group.copy_from_rank0([p for p in block.parameters() if p.requires_grad])  # one start, as ever

    def root(self, model: nn.Module) -> None:
        """What is outside the (sharded) blocks: adapters on any 4-bit layer there, trainable
        flags, norms and (float32 residual) the input embeddings' output in float32."""
        from ..dist.shard import blocks
        from ..model import surgery
        from ..nn import AdaptedLinear
        from .run import lora_spec

        inner = {id(m) for b in blocks(model) for m in b.modules()}
        outside = [(n, m) for n, m in model.named_modules() if id(m) not in inner]
        spec, float32 = lora_spec(self.cfg), self.cfg.residual_dtype == "float32"
        layers = [n for n, m in outside if isinstance(m, AdaptedLinear)]
        for name in surgery.select_targets(layers, spec.target_modules, spec.modules_to_skip) if layers else []:
            model.get_submodule(name).add_adapter("default", spec)
        for name, module in outside:
            for p in module.parameters(recurse=False):
                p.requires_grad = ".adapters." in f".{name}."
            if "norm" in type(module).__name__.lower():
                module.float()
            elif isinstance(module, AdaptedLinear) and float32:
                module.keep_input_dtype = True
        if float32:
            surgery.float32_output(model.get_input_embeddings())
        surgery.set_active_adapter(model, "default")
        self.group.copy_from_rank0([p for n, m in outside for p in m.parameters(recurse=False) if p.requires_grad])
        model.config.use_cache = self.use_cache  # a block's set-up may have set it


def _finish_tokenizer(tok, cfg: TrainConfig) -> None:
    from ..model.templates import apply_chat_template
    apply_chat_template(tok, cfg.chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token


def _sharding_figures(model: nn.Module, group: Group, meter, log) -> dict:
    """summary.json's sharding figures, as run.shard_for_group gives them, and each rank's load peaks."""
    from ..dist.shard import held_bytes, whole_parameters
    from .run import sharding_lines
    whole_names = whole_parameters(model)
    if whole_names:
        log(f"kept whole on every rank (their shards would cut the 8-bit optimiser's 256-value blocks): "
            f"{', '.join(whole_names[:5])}{' ...' if len(whole_names) > 5 else ''} ({len(whole_names)} in all)")
    held = held_bytes(model)
    by_rank, loads = group.gather(held), group.gather(meter.as_dict())
    if group.is_main:
        log(sharding_lines(group.world, by_rank) + "\n  loaded sharded: each rank's peak while loading "
            + ", ".join(f"rank {r} {load['load_peak_held_bytes'] / 2**20:.1f}" for r, load in enumerate(loads)))
    return {"processes": group.world, "quantised_bytes": held["base_whole"],
            "quantised_bytes_by_rank": [h["base"] for h in by_rank] if by_rank else [],
            "held_bytes_by_rank": by_rank, "kept_whole": whole_names, "load_by_rank": loads}
