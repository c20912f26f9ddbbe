"""The run-time policy of `qforge train`: will a run fit, what would, and selective checkpointing.

Decided once per run, before the model is loaded, from the memory model (qforge.plan.memory) and the
memory the run's device has free.
"""
from __future__ import annotations

import dataclasses
import math
import os

from .memory import CPU_BF16, CUDA_BF16, MemoryConstants, ModelArch, Plan, format_gb, plan_run

# ---------------------------------------------------------------- will a run fit? (qforge train)

def constants_for(device: str) -> MemoryConstants:
    """The calibrated constants of a device kind: CPU_BF16 for "cpu", else CUDA_BF16."""
    return CPU_BF16 if str(device).startswith("cpu") else CUDA_BF16


def plan_for_config(cfg, model_config: dict | ModelArch | str | None = None, device: str = "cpu",
                    world: int = 1, **changes: object) -> Plan:
    """The plan of a TrainConfig-like `cfg` (attributes method, batch_size, max_seq_len, rank,
    gradient_checkpointing, quant_type, double_quant, optimizer, model; objective when it has one:
    a dpo/orpo batch of batch_size pairs is 2 * batch_size sequences), sized at max_seq_len
    (the longest a row can be), with `changes` (the same attribute names) applied on top.
    model_config: a config dict, ModelArch, transformers config (anything with to_dict()), a
    name or path for load_arch; None reads cfg.model with load_arch.
    world: the run's processes (qforge train --nproc; cfg.batch_size is the global micro-batch, each
    rank takes its rows); with world > 1 or cfg.offload_base, per_gpu_total is one rank's figure
    (qforge.plan.ranks.per_rank: everything sharded / world, FSDP's gathers, the base on the host).
    The checks below compare per_gpu_total (equal to total for one process without offload)."""
    settings = {k: getattr(cfg, k) for k in ("method", "batch_size", "max_seq_len", "rank", "gradient_checkpointing",
                                             "quant_type", "double_quant", "optimizer")}
    settings["keep_base_outputs"] = bool(getattr(cfg, "keep_base_outputs", False))  # auto (None): the minimum
    settings.update(changes)
    if model_config is None:
        model_config = cfg.model
    elif hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    optimizer = {"adamw": "adamw_torch"}.get(settings["optimizer"], settings["optimizer"])
    run = dict(seq_len=settings["max_seq_len"], batch_size=settings["batch_size"], rank=settings["rank"],
               gradient_checkpointing=settings["gradient_checkpointing"], quant_type=settings["quant_type"],
               double_quant=settings["double_quant"], optimizer=optimizer, constants=constants_for(device),
               keep_base_outputs=settings["keep_base_outputs"], chunked_loss=True,  # the trainer's loss
               adapter_bytes=2 if getattr(cfg, "adapter_dtype", "float32") == "bfloat16" else 4,
               residual_bytes=4 if getattr(cfg, "residual_dtype", "bfloat16") == "float32" else 2,
               objective=settings.get("objective", getattr(cfg, "objective", "sft")))
    plan = plan_run(model_config, settings["method"], **run)
    offload = bool(getattr(cfg, "offload_base", False)) and settings["method"] == "qlora"
    if world > 1 or offload:
        from .ranks import per_rank  # ranks builds on memory, as this module does
        rank_total = per_rank(model_config, settings["method"], world=world, offload_base=offload, **run)["total"]
        plan = dataclasses.replace(plan, num_gpus=world, per_gpu_total=rank_total)
    return plan


def _describe(changes: dict) -> str:
    """The settings that make `changes` to cfg as the interface in use spells them, e.g. '--method
    qlora --batch-size 2 --grad-accum 2' (a job: 'hyperparameters.method = "qlora", ...')."""
    from ..train.config import INTERFACE, setting
    parts = [setting(key, value) or f"{key} {value}" for key, value in changes.items()]
    return (", " if INTERFACE.get() == "api" else " ").join(parts)


def fitting_alternatives(cfg, model_config, available_bytes: int, device: str = "cpu",
                         world: int = 1) -> list[tuple[str, int]]:
    """(flags, bytes) of the single changes to cfg that would fit, cheapest change first: QLoRA in
    place of lora/full, gradient checkpointing on, the largest smaller batch (gradient
    accumulation keeping the effective batch), the longest shorter max_seq_len (halving), and
    last all of QLoRA + checkpointing + batch 1 together."""
    candidates = []
    if getattr(cfg, "keep_base_outputs", None) and cfg.gradient_checkpointing:
        candidates.append({"keep_base_outputs": False})
    if cfg.method != "qlora":
        candidates.append({"method": "qlora"})
    if not cfg.gradient_checkpointing:
        candidates.append({"gradient_checkpointing": True})
    for batch in range(cfg.batch_size - 1, 0, -1):
        if plan_for_config(cfg, model_config, device, world, batch_size=batch).per_gpu_total <= available_bytes:
            accum = cfg.grad_accum * math.ceil(cfg.batch_size / batch)
            candidates.append({"batch_size": batch, "grad_accum": accum})
            break
    seq = cfg.max_seq_len // 2
    while seq >= 64:
        if plan_for_config(cfg, model_config, device, world, max_seq_len=seq).per_gpu_total <= available_bytes:
            candidates.append({"max_seq_len": seq})
            break
        seq //= 2
    smallest = {"method": "qlora", "gradient_checkpointing": True, "batch_size": 1,
                "grad_accum": cfg.grad_accum * cfg.batch_size}
    if getattr(cfg, "keep_base_outputs", None):
        smallest["keep_base_outputs"] = False
    candidates.append(smallest)
    found, seen = [], set()
    for change in candidates:
        plan_changes = {k: v for k, v in change.items() if k != "grad_accum"}
        need = plan_for_config(cfg, model_config, device, world, **plan_changes).per_gpu_total
        flags = _describe({k: v for k, v in change.items() if getattr(cfg, k) != v})
        if need <= available_bytes and flags and flags not in seen:
            found.append((flags, need))
            seen.add(flags)
    return found


def check_fit(cfg, model_config: dict | ModelArch | str | None, available_bytes: int,
              device: str = "cpu", world: int = 1) -> tuple[bool, str]:
    """(fits, message): whether the plan of `cfg` (see plan_for_config) fits available_bytes, and
    a one-paragraph message; when it does not, the message names the settings that would fit.
    world > 1: one process of the run against the memory one process can use."""
    plan = plan_for_config(cfg, model_config, device, world)
    need = plan.per_gpu_total
    where = "GPU" if device.startswith("cuda") else "RAM"
    run = (f"{cfg.method}, batch {cfg.batch_size} x {cfg.max_seq_len} tokens, gradient checkpointing "
           f"{'on' if cfg.gradient_checkpointing else 'off'}"
           + (", base offloaded" if getattr(cfg, "offload_base", False) else ""))
    who = f" per process of {world}" if world > 1 else ""
    if need <= available_bytes:
        return True, f"plan: {run} needs about {format_gb(need)}{who}; {format_gb(available_bytes)} {where} available"
    message = (f"this run may not fit: {run} needs about {format_gb(need)}{who} (qforge plan's estimate at "
               f"max_seq_len), but only {format_gb(available_bytes)} of {where} is available.")
    options = fitting_alternatives(cfg, model_config, available_bytes, device, world)
    if options:
        message += " Would fit: " + "; ".join(f"{flags} ({format_gb(need)})" for flags, need in options) + "."
    else:
        message += " Nothing smaller fits either (QLoRA, checkpointing, batch 1): free memory or use a smaller model."
    return False, message


def available_memory(device: str = "cpu") -> int:
    """Bytes a run can use now: free GPU memory (torch.cuda.mem_get_info) or available RAM (psutil)."""
    if str(device).startswith("cuda"):
        import torch
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil
    return int(psutil.virtual_memory().available)


def per_process(available_bytes: int, device: str = "cpu", world: int = 1) -> int:
    """The memory one process of a `world`-process run can use: a GPU's free memory is its own; the
    host's RAM is shared by the processes on this machine (torchrun's LOCAL_WORLD_SIZE, else all)."""
    if world <= 1 or str(device).startswith("cuda"):
        return available_bytes
    return available_bytes // max(1, min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world))))


AUTO_KEEP_SHARE = 0.8  # auto selective checkpointing: the plan with it must fit in this share of memory


def keep_base_outputs_for(cfg, model_config: dict | ModelArch | str | None = None, device: str = "cpu",
                          available_bytes: int | None = None, world: int = 1) -> tuple[bool, str]:
    """(keep, reason): whether a run keeps its base outputs under gradient checkpointing
    (qforge.nn.recompute). An explicit cfg.keep_base_outputs wins; auto (None) keeps them when the
    plan with them fits in AUTO_KEEP_SHARE of the available memory. Only lora and qlora with
    gradient checkpointing have base outputs to keep. `device`: the run's device kind ("cpu", "cuda")."""
    if cfg.method not in ("lora", "qlora") or not cfg.gradient_checkpointing:
        return False, ""
    if cfg.keep_base_outputs is not None:
        how = "keeps the base products" if cfg.keep_base_outputs else "recomputes everything"
        return bool(cfg.keep_base_outputs), f"gradient checkpointing {how} (--{'' if cfg.keep_base_outputs else 'no-'}keep-base-outputs)"
    try:
        available = per_process(available_memory(device) if available_bytes is None else available_bytes,
                                device, world)
        without = plan_for_config(cfg, model_config, device, world, keep_base_outputs=False).per_gpu_total
        with_kept = plan_for_config(cfg, model_config, device, world, keep_base_outputs=True).per_gpu_total
    except (ValueError, FileNotFoundError, OSError) as exc:
        return False, f"gradient checkpointing recomputes everything (plan not available: {exc})"
    extra = format_gb(with_kept - without)
    if with_kept <= AUTO_KEEP_SHARE * available:
        return True, (f"gradient checkpointing keeps the base products (selective, +{extra}; plan "
                      f"{format_gb(with_kept)} of {format_gb(available)} available{_how_to_save()})")
    return False, (f"gradient checkpointing recomputes everything: keeping the base products (+{extra}) "
                   f"would need {format_gb(with_kept)}, more than {AUTO_KEEP_SHARE:.0%} of {format_gb(available)} available")


def warn_if_unfit(cfg, model_config: dict | ModelArch | str | None = None, log=print, device: str = "cpu",
                  available_bytes: int | None = None, world: int = 1) -> bool:
    """Log a warning, before a run starts, when its plan does not fit the memory this process can
    see; returns whether it fits. `device`: the run's device kind ("cpu", "cuda"); `world`: the run's
    processes (each process is sized as one rank of them: qforge.plan.ranks.per_rank).
    A model the planner cannot read (a damaged GGUF file, an unknown architecture) is not checked."""
    try:
        available = per_process(available_memory(device) if available_bytes is None else available_bytes,
                                device, world)
        fits, message = check_fit(cfg, model_config, available, device, world)
    except (ValueError, FileNotFoundError, OSError) as exc:
        log(f"plan: memory not checked ({exc})")
        return True
    if not fits:
        log("warning: " + message)
    return fits


def _how_to_save() -> str:
    """'; --no-keep-base-outputs to save it', as the interface in use spells the setting (the jobs
    API has none: the service keeps the products only when they fit, as here)."""
    from ..train.config import setting
    flag = setting("keep_base_outputs", False)
    return f"; {flag} to save it" if flag else ""
