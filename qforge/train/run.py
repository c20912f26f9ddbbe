"""A whole run from a TrainConfig: load the model for the method, read the data, train, save the
adapter (PEFT format) and a summary. Under torchrun every rank runs this; the 4-bit base is
sharded across them (qforge.dist) and rank 0 alone writes files."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..dist import Group
from .config import TrainConfig
from .loop import TrainResult, train_loop


def lora_spec(cfg: TrainConfig):
    from ..nn import LoraSpec
    return LoraSpec(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                    use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, loftq_iters=cfg.loftq_iters,
                    dtype=getattr(torch, cfg.adapter_dtype))


def load_for_method(cfg: TrainConfig, device: torch.device | None = None):
    """(model, tokenizer) ready to train on `device` (default: cfg.device resolved): a 4-bit base
    with adapters (qlora), a dense frozen base with the same adapters (lora), or every weight
    trainable (full). Gradient checkpointing keeps
    the base products per cfg.keep_base_outputs (auto: qforge.plan.keep_base_outputs_for);
    attention is qforge's (qforge.nn.attention: SDPA except for short training rows on the CPU)."""
    from ..model import surgery
    from ..model.conversion import router_linear_names
    from ..model.load import load_model
    from ..devices import resolve_device
    from ..plan import keep_base_outputs_for

    device = device if device is not None else resolve_device(cfg.device)
    dtype = getattr(torch, cfg.compute_dtype)
    residual = getattr(torch, cfg.residual_dtype)  # float32: embeddings and norms read in float32 (qforge.model.load)
    torch.manual_seed(cfg.seed)  # the adapters' initial values: the same in every process of the run
    if cfg.method == "qlora":
        hqq = cfg.quant_type.startswith("hqq")  # an HQQ base: its group size is the loader's blocksize
        model, tok = load_model(cfg.model, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                                blocksize=cfg.hqq_group_size if hqq else 64, compute_dtype=dtype,
                                target_modules=cfg.target_modules, lora=lora_spec(cfg), revision=cfg.revision,
                                device=device, residual_dtype=residual)
    else:
        model, tok = load_model(cfg.model, compute_dtype=dtype, quantize=False, revision=cfg.revision, device=device,
                                residual_dtype=residual)
        if cfg.method == "lora":
            spec = lora_spec(cfg)
            routers = set(router_linear_names(model))  # MoE routers stay frozen and adapter-free, as in qlora
            targets = [n for n in surgery.select_targets(surgery.linear_names(model), spec.target_modules,
                                                         spec.modules_to_skip) if n not in routers]
            surgery.dense_lora_linears(model, targets, dtype)
            surgery.dense_lora_experts(model, dtype)  # MoE: LoRA on the experts, as for qlora
            surgery.add_adapter(model, "default", spec)
    if device.type != "cpu":  # streamed there already; this only moves what surgery added on the CPU
        model.to(device)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad = True
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    else:
        keep = cfg.keep_base_outputs
        if keep is None:
            keep = keep_base_outputs_for(cfg, model.config, device.type)[0]
        surgery.prepare_for_kbit_training(model, cfg.gradient_checkpointing, keep_base_outputs=keep)
        if cfg.residual_dtype == "float32":
            surgery.use_float32_residual(model)
    surgery.use_qforge_attention(model)
    from ..model.templates import apply_chat_template
    apply_chat_template(tok, cfg.chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) as PEFT's print_trainable_parameters counts them: a 4-bit weight counts
    its elements (out x in), not the bytes of its packed codes, and tied weights count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from ..model.surgery import hqq_layers, quantized_layers
    for _, layer in [*quantized_layers(model), *hqq_layers(model)]:  # codes are a buffer, not a Parameter
        stored = sum(p.numel() for p in layer.parameters(recurse=False)  # FSDP's float storage of the codes
                     if p is not layer.bias)
        total += math.prod(layer.base.shape) - stored
    from ..model.surgery import expert_layers
    for _, experts in expert_layers(model):  # 4-bit MoE experts: buffers too, counted as [E, out, in]
        total += sum(math.prod(bank.shape) for bank in experts.banks.values())
    return trainable, total


def shard_for_group(model, cfg: TrainConfig, group: Group, log=print) -> dict:
    """Shard the 4-bit base across `group` (several processes); returns what each rank holds."""
    from ..dist import local_quantised_bytes, shard_base
    if cfg.method != "qlora":
        raise ValueError(f"several processes train only --method qlora (the sharded 4-bit base); got {cfg.method}")
    if cfg.quant_type.startswith("hqq"):
        raise ValueError(f"several processes shard an nf4/fp4 base; quant_type {cfg.quant_type} (HQQ) trains in "
                         "one process")
    shard_base(model, group, storage_dtype=getattr(torch, cfg.compute_dtype))
    group.copy_from_rank0([p for p in model.parameters() if p.requires_grad])
    held, whole = local_quantised_bytes(model)
    by_rank = group.gather(held)
    if group.is_main:
        log(f"{group.world} processes: 4-bit base of {whole / 2**20:.1f} MiB sharded, "
            f"{', '.join(f'rank {r} holds {b / 2**20:.1f} MiB' for r, b in enumerate(by_rank))}")
    return {"processes": group.world, "quantised_bytes": whole, "quantised_bytes_by_rank": by_rank}


def run_training(cfg: TrainConfig, log=print, group: Group | None = None) -> tuple[TrainResult, dict]:
    """Train per `cfg`; returns the result and the summary written to output_dir/summary.json.
    With a `group` of several processes every rank calls this; rank 0 writes and logs."""
    from .data import build_dataset

    from .preflight import check_before_loading
    from .tracking import Trackers

    group = group or Group()
    if not group.is_main:
        log = lambda *_: None  # noqa: E731
    from ..devices import resolve_device
    from ..plan import keep_base_outputs_for, warn_if_unfit
    device = group.device if group.distributed else resolve_device(cfg.device)  # decided once, passed down
    cfg, splits, hub_folder = check_before_loading(cfg, check_dir=group.is_main)  # data, output, template, ...
    arch = str(hub_folder) if hub_folder is not None else None  # the planner reads a Hub model's config.json
    warn_if_unfit(cfg, arch, log=log, device=device.type)  # before loading: says which settings would fit
    if cfg.keep_base_outputs is None:  # auto: decided once, from the plan, and logged
        keep, why = keep_base_outputs_for(cfg, arch, device=device.type)
        if group.distributed and group.any(not keep) and keep:  # every rank the same: all keep or none
            keep, why = False, ("gradient checkpointing recomputes everything: another rank lacks the memory "
                                "to keep the base products")
        if why:
            log(why)
        cfg = dataclasses.replace(cfg, keep_base_outputs=keep)
    t0 = time.perf_counter()
    model, tok = load_for_method(cfg, device)
    trainable, total = count_parameters(model)  # before sharding turns the 4-bit codes into Parameters
    sharding = shard_for_group(model, cfg, group, log) if group.distributed else {}
    log(f"model {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), loaded in {time.perf_counter() - t0:.1f} s")
    train_set, eval_set, report = build_dataset(cfg.data, tok, fmt=cfg.data_format, max_seq_len=cfg.max_seq_len,
                                                train_on=cfg.train_on, pack=cfg.pack, eval_path=cfg.eval_data,
                                                eval_fraction=cfg.eval_fraction, seed=cfg.seed, splits=splits)
    log(f"data: {report}")
    out = Path(cfg.output_dir)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    trackers = Trackers(cfg, out, cfg.report_targets() if group.is_main else [])
    try:
        result = train_loop(model, tok, train_set, eval_set, cfg, log=log, group=group, device=device,
                            on_step=trackers.log if trackers.targets else None)
    finally:
        trackers.close()
    summary = {
        "method": cfg.method, "model": cfg.model, "steps_done": len(result.losses), "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "tokens": result.tokens, "train_seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
        "trainable_parameters": trainable, "interrupted": result.interrupted, **sharding,
    }
    if cfg.method != "full" and not result.interrupted:
        summary["adapter"] = str(out / "adapter")
    if group.is_main:
        if "adapter" in summary:
            from ..adapters import save_adapter
            save_adapter(model, out / "adapter", name="default", base_model_name_or_path=cfg.model, tokenizer=tok)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    group.barrier()  # the others wait while rank 0 writes
    return result, summary
