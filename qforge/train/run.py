"""The one way to train: `prepare(cfg) -> Run`, then `Run.train()` and `Run.save()`.

    cfg --preflight--> cfg (checked; per-epoch settings; a continued adapter's shape) --plan-->
                       keep_base_outputs, fit
        --_setup_model--> base (qforge.model.load) + adapters (fresh, or --adapter's weights as the
                          trainable "default"; --ref-adapter frozen as "reference") | LoftQ |
                          dense LoRA | full, float32 residual, checkpointing, attention, chat template
        --_setup_data---> train / eval sets: SFT rows, or preference pairs (objective dpo, orpo)
    Run.train(on_step)  -> TrainResult (qforge.train.loop, trackers)
    Run.save()          -> adapter (PEFT files) + summary.json, rank 0

`qforge train`, `qforge demo`, `qforge bench` and the jobs' trainer all go through here. Under
torchrun every rank prepares and trains; the 4-bit base is sharded across them (qforge.dist) and
rank 0 alone writes files."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..dist import Group
from .config import TrainConfig
from .loop import REFERENCE_ADAPTER, TrainResult, train_loop
from .sharded_load import load_sharded_for_method


@dataclass
class Plan:
    """What the planner decided before loading: whether gradient checkpointing keeps the base
    products (and why), and whether the plan fits the memory this process can see."""
    keep_base_outputs: bool
    why: str = ""
    fits: bool = True


@dataclass
class Run:
    """A prepared training: `cfg` is final (after preflight and the plan's decisions)."""
    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    train_set: list
    eval_set: list | None
    data_report: object
    device: torch.device
    plan: Plan
    group: Group
    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    sharding: dict = field(default_factory=dict)  # processes and the 4-bit bytes each rank holds
    log: Callable = print
    result: TrainResult | None = None

    def train(self, on_step=None) -> TrainResult:
        """Run the loop (checkpoints, metrics.jsonl, loss.png under output_dir; resume per cfg);
        `on_step(record)` is called after every optimiser step, beside the trackers."""
        from .tracking import Trackers

        trackers = Trackers(self.cfg, self.output_dir, self.cfg.report_targets() if self.group.is_main else [])
        hooks = [h for h in (trackers.log if trackers.targets else None, on_step) if h is not None]
        try:
            self.result = train_loop(self.model, self.tokenizer, self.train_set, self.eval_set, self.cfg,
                                     log=self.log, group=self.group, device=self.device,
                                     on_step=_chain(hooks))
        finally:
            trackers.close()
        return self.result

    def summary(self) -> dict:
        """The figures of the finished run (summary.json's contents)."""
        cfg, result = self.cfg, self.result
        summary = {
            "method": cfg.method, "objective": cfg.objective, "model": cfg.model, "steps_done": len(result.losses),
            "steps": result.steps,
            "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
            "final_eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
            "tokens": result.tokens, "trained_tokens": result.trained_tokens, "train_seconds": round(result.seconds, 2),
            "tokens_per_second": round(result.tokens / max(result.seconds, 1e-9), 1),
            "trainable_parameters": self.trainable_parameters, "interrupted": result.interrupted, **self.sharding,
        }
        if result.metrics:  # preference runs: the last step's metrics and the last evaluation's (TRL's names)
            summary["final_metrics"] = {k: v for k, v in result.metrics[-1].items() if k != "step"}
        if result.eval_metrics:
            summary["final_eval_metrics"] = {k: v for k, v in result.eval_metrics[-1].items() if k != "step"}
        if cfg.method != "full" and not result.interrupted:
            summary["adapter"] = str(self.output_dir / "adapter")
        if cfg.method == "full" and not result.interrupted:
            summary["model_dir"] = str(self.output_dir / "model")  # ("model" names the base)
        return summary

    def save(self) -> dict:
        """Write the adapter (PEFT files, with the tokenizer) unless the run was interrupted or
        trained every weight, and summary.json; rank 0 writes, every rank waits. Returns the summary.
        (config.yaml is written by prepare, so that an interrupted run has it too.)"""
        if self.result is None:
            raise ValueError("Run.save() before Run.train(): nothing trained yet")
        from ..dist.consolidate import whole_trainable
        summary = self.summary()
        with whole_trainable(self.model, self.group):  # sharded adapters gathered whole (every rank joins)
            self._write(summary)
        self.group.barrier()  # the others wait while rank 0 writes
        return summary

    def _write(self, summary: dict) -> None:
        """Rank 0 writes the adapter (or the full model) and summary.json."""
        if self.group.is_main:
            if "adapter" in summary:
                from ..adapters import save_adapter
                save_adapter(self.model, self.output_dir / "adapter", name="default",
                             base_model_name_or_path=self.cfg.model, tokenizer=self.tokenizer)
            if "model_dir" in summary:  # a full fine-tune: the whole model, a Hugging Face folder
                save_full_model(self.model, self.tokenizer, self.output_dir / "model")
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def save_full_model(model, tokenizer, out_dir: Path) -> Path:
    """A fully fine-tuned model as a Hugging Face folder (save_pretrained, in its training dtype)
    with its tokenizer, written atomically: what `qforge serve --quant-type none` and the jobs
    service serve as a dedicated model."""
    from ..adapters.peft_format import write_folder_atomically
    from ..model.checkpoint import save_tokenizer

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)

    return write_folder_atomically(out_dir, write)


def _chain(hooks: list):
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def call_all(record: dict) -> None:
        for hook in hooks:
            hook(record)
    return call_all


# ---- prepare: set-up in named parts ----------------------------------------------------------
def prepare(cfg: TrainConfig, log=print, group: Group | None = None, detail=None) -> Run:
    """Check, plan, load and read everything a training needs; nothing is trained yet.
    With a `group` of several processes every rank calls this; rank 0 logs and writes.
    `detail` takes the routine lines (what was loaded, the data report, the checkpointing choice;
    default: `log`): `qforge train` shows them with --verbose only."""
    from ..devices import resolve_device

    group = group or Group()
    if not group.is_main:
        log = lambda *_: None  # noqa: E731
    detail = log if detail is None or not group.is_main else detail
    device = group.device if group.distributed else resolve_device(cfg.device)  # decided once, passed down
    cfg, splits, arch = _setup_checks(cfg, group, log)
    check_processes(cfg, group.world)
    cfg, plan = _setup_plan(cfg, arch, device, group, log, detail)
    t0 = time.perf_counter()
    loaded = load_sharded_for_method(cfg, group, log) if group.distributed else None
    if loaded is not None:  # each rank read and kept only its shard (qforge.train.sharded_load)
        model, tok, (trainable, total), sharding = loaded
    else:
        model, tok = load_for_method(cfg, device)
        trainable, total = count_parameters(model)  # before sharding turns the 4-bit codes into Parameters
        if getattr(model, "base_offload", None) is not None:
            log(model.base_offload.describe())
        sharding = shard_for_group(model, cfg, group, log) if group.distributed else {}
    detail(f"model {cfg.model} ({cfg.method}): {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%), loaded in {time.perf_counter() - t0:.1f} s")
    train_set, eval_set, report = _setup_data(cfg, tok, splits)
    detail(f"data: {report}")
    out = _setup_output(cfg, group)
    return Run(cfg, model, tok, train_set, eval_set, report, device, plan, group, out, trainable, total,
               sharding, log)


def _setup_checks(cfg: TrainConfig, group: Group, log=print):
    """Preflight (data, adapters, output folder, template, trackers, model source): (cfg, splits,
    the architecture the planner reads: a Hub model's local folder, else None)."""
    from .preflight import check_before_loading
    cfg, splits, hub_folder = check_before_loading(cfg, check_dir=group.is_main, log=log)
    return cfg, splits, (str(hub_folder) if hub_folder is not None else None)


def _setup_plan(cfg: TrainConfig, arch, device: torch.device, group: Group, log,
                detail=None) -> tuple[TrainConfig, Plan]:
    """Warn when the plan does not fit; decide keep_base_outputs once (auto: from the plan), the
    same on every rank, and write it into cfg."""
    from ..plan import keep_base_outputs_for, warn_if_unfit
    # before loading: says which settings would fit; a process of N is sized as one rank of N
    fits = warn_if_unfit(cfg, arch, log=log, device=device.type, world=group.world)
    if cfg.keep_base_outputs is not None:
        return cfg, Plan(bool(cfg.keep_base_outputs), "given", fits)
    keep, why = keep_base_outputs_for(cfg, arch, device=device.type, world=group.world)
    if group.distributed and group.any(not keep) and keep:  # every rank the same: all keep or none
        keep, why = False, ("gradient checkpointing recomputes everything: another rank lacks the memory "
                            "to keep the base products")
    if why:
        (detail or log)(why)
    return dataclasses.replace(cfg, keep_base_outputs=keep), Plan(keep, why, fits)


def _setup_data(cfg: TrainConfig, tok, splits=None):
    """(train_set, eval_set, report) per every data setting of cfg (format, train_on, packing,
    eval split), from the rows preflight already read; preference pairs for dpo/orpo."""
    if cfg.objective != "sft":
        return _preference_data(cfg, tok, splits)
    from .data import build_dataset
    return build_dataset(cfg.data, tok, fmt=cfg.data_format, max_seq_len=cfg.max_seq_len, train_on=cfg.train_on,
                         pack=cfg.pack, eval_path=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                         splits=splits)


def _preference_data(cfg: TrainConfig, tok, splits=None):
    """Preference pairs tokenised with the chat template (qforge.train.preference_data): (train
    pairs, eval pairs or None, report). Pairs are never packed; a pair is one row of batch_size."""
    from .data import DataError
    from .preflight import read_preference_splits
    from .preference_data import tokenize_pairs
    if cfg.pack:
        raise ValueError(f"pack: objective {cfg.objective} trains on pairs, which are not packed")
    rows, eval_rows, shape, _ = splits or read_preference_splits(cfg)
    train, report = tokenize_pairs(rows, tok, cfg.max_seq_len, where=str(cfg.data))
    if not train:
        raise DataError(f"{cfg.data}: no pair keeps a completion token on both sides at max_seq_len="
                        f"{cfg.max_seq_len}: raise max_seq_len or shorten the prompts")
    held = tokenize_pairs(eval_rows, tok, cfg.max_seq_len, where=str(cfg.eval_data or cfg.data))[0] if eval_rows else []
    return train, (held or None), PreferenceReport(report, shape, len(held))


@dataclass
class PreferenceReport:
    """The data line of a preference run: the training pairs' PairReport, their shape, eval pairs."""
    pairs: object
    shape: str
    eval_pairs: int

    def __str__(self) -> str:
        return f"{self.shape} preference pairs: {self.pairs}; {self.eval_pairs} eval pairs"


def _setup_output(cfg: TrainConfig, group: Group) -> Path:
    out = Path(cfg.output_dir)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
    return out


def run_training(cfg: TrainConfig, log=print, group: Group | None = None) -> tuple[TrainResult, dict]:
    """prepare + train + save: (result, the summary written to output_dir/summary.json)."""
    run = prepare(cfg, log=log, group=group)
    result = run.train()
    return result, run.save()


# ---- the model: base, then what training adds ------------------------------------------------
def lora_spec(cfg: TrainConfig):
    from ..nn import LoraSpec
    return LoraSpec(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_modules,
                    use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, loftq_iters=cfg.loftq_iters,
                    dtype=getattr(torch, cfg.adapter_dtype))


def load_for_method(cfg: TrainConfig, device: torch.device | None = None):
    """(model, tokenizer) ready to train on `device` (default: cfg.device resolved): a 4-bit base
    with adapters (qlora; LoftQ-initialised with cfg.loftq_iters), a dense frozen base with the same
    adapters (lora), or every weight trainable (full); then the float32 residual (cfg.residual_dtype),
    gradient checkpointing (keeping the base products per cfg.keep_base_outputs; auto: the plan),
    qforge's attention (SDPA except for short training rows on the CPU) and the chat template."""
    from ..devices import resolve_device
    from ..model import surgery

    device = device if device is not None else resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the adapters' initial values: the same in every process of the run
    if cfg.method == "qlora" and cfg.loftq_iters > 0:
        model, tok = _loftq_base_and_adapters(cfg)
    elif cfg.method == "qlora":  # --offload-base: the 4-bit base is loaded into host memory and stays there
        model, tok = _quantised_base(cfg, torch.device("cpu") if cfg.offload_base else device)
        attach_adapters(model, cfg)  # on the device of the layer it adapts
    else:
        model, tok = _dense_base(cfg, device)
        if cfg.method == "lora":
            _dense_adapters(model, cfg)
    if cfg.offload_base:  # before the move: the codes stay in (pinned) host memory, each block brought in turn
        from .offload_base import offload_base
        offload_base(model, device)
    if device.type != "cpu":  # streamed there already; this only moves what was built on the CPU
        model.to(device)
    _setup_training_switches(model, cfg, device)
    freeze_reference(model)
    from ..model.templates import apply_chat_template
    apply_chat_template(tok, cfg.chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _keep_float32(cfg: TrainConfig) -> bool:
    return cfg.residual_dtype == "float32"  # the embeddings and norms read as stored, not rounded


def _quantised_base(cfg: TrainConfig, device: torch.device):
    from ..model.load import load_model
    hqq = cfg.quant_type.startswith("hqq")  # an HQQ base: its group size is the loader's blocksize
    return load_model(cfg.model, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                      blocksize=cfg.hqq_group_size if hqq else 64, compute_dtype=getattr(torch, cfg.compute_dtype),
                      target_modules=cfg.target_modules, revision=cfg.revision, device=device,
                      keep_float32=_keep_float32(cfg))


def _loftq_base_and_adapters(cfg: TrainConfig):
    """LoftQ: the dense float32 model quantised layer by layer with adapters initialised against
    each quantisation error (qforge.adapters.loftq); on the CPU, moved by the caller."""
    from ..adapters.loftq import load_loftq_model
    return load_loftq_model(cfg.model, lora_spec(cfg), "default", cfg.quant_type, 64, cfg.double_quant,
                            getattr(torch, cfg.compute_dtype), cfg.target_modules, cfg.revision)


def _dense_base(cfg: TrainConfig, device: torch.device):
    from ..model.load import load_model
    return load_model(cfg.model, compute_dtype=getattr(torch, cfg.compute_dtype), quantize=False,
                      revision=cfg.revision, device=device, keep_float32=_keep_float32(cfg))


def _dense_adapters(model, cfg: TrainConfig) -> None:
    """BF16 LoRA: the targets become AdaptedLinear over their dense frozen weight, with adapters."""
    from ..model import surgery
    from ..model.conversion import router_linear_names
    spec, dtype = lora_spec(cfg), getattr(torch, cfg.compute_dtype)
    routers = set(router_linear_names(model))  # MoE routers stay frozen and adapter-free, as in qlora
    targets = [n for n in surgery.select_targets(surgery.linear_names(model), spec.target_modules,
                                                 spec.modules_to_skip) if n not in routers]
    surgery.dense_lora_linears(model, targets, dtype)
    surgery.dense_lora_experts(model, dtype)  # MoE: LoRA on the experts, as for qlora
    attach_adapters(model, cfg)


REFERENCE = REFERENCE_ADAPTER  # DPO's --ref-adapter, frozen (the loop's preference_settings names it)


def attach_adapters(model, cfg: TrainConfig) -> None:
    """The trainable adapter "default": fresh (lora_spec), or cfg.adapter's weights (its own shape:
    preflight put it into cfg) in cfg.adapter_dtype; and cfg.ref_adapter as "reference", frozen
    later by freeze_reference. "default" is left active."""
    from ..adapters import load_adapter
    from ..model import surgery
    dtype = getattr(torch, cfg.adapter_dtype)
    if cfg.adapter is not None:
        load_adapter(model, cfg.adapter, name="default", dtype=dtype)
    else:
        surgery.add_adapter(model, "default", lora_spec(cfg))
    if cfg.ref_adapter is not None:
        load_adapter(model, cfg.ref_adapter, name=REFERENCE, dtype=dtype)
        surgery.set_active_adapter(model, "default")


def freeze_reference(model) -> None:
    """The reference adapter is never trained (prepare_for_kbit_training made every adapter
    trainable) and, like TRL's reference model, runs without dropout."""
    for name, param in model.named_parameters():
        if f"adapters.{REFERENCE}." in name:
            param.requires_grad = False
    for module in model.modules():
        adapters = getattr(module, "adapters", None)
        if isinstance(adapters, torch.nn.ModuleDict) and REFERENCE in adapters \
                and hasattr(adapters[REFERENCE], "dropout"):
            adapters[REFERENCE].dropout = torch.nn.Identity()


def _setup_training_switches(model, cfg: TrainConfig, device: torch.device) -> None:
    """What is trainable, gradient checkpointing, the float32 residual and qforge's attention."""
    from ..model import surgery
    from ..plan import keep_base_outputs_for

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
    if cfg.residual_dtype == "float32":  # the one place the switch is read
        surgery.use_float32_residual(model)
    surgery.use_qforge_attention(model)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) as PEFT's print_trainable_parameters counts them: a 4-bit weight counts
    its elements (out x in), not the bytes of its packed codes, and tied weights count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from ..model.surgery import expert_layers, hqq_layers, quantized_layers
    for _, layer in [*quantized_layers(model), *hqq_layers(model)]:  # codes are a buffer, not a Parameter
        stored = sum(p.numel() for p in layer.parameters(recurse=False)  # FSDP's float storage of the codes
                     if p is not layer.bias)
        total += math.prod(layer.base.shape) - stored
    for _, experts in expert_layers(model):  # 4-bit MoE experts: buffers too, counted as [E, out, in]
        total += sum(math.prod(bank.shape) for bank in experts.banks.values())
    return trainable, total


def check_processes(cfg: TrainConfig, world: int) -> None:
    """The one-line refusals of settings that train in one process only, before anything loads."""
    from .offload_base import check_offload
    check_offload(cfg, world)
    if world > 1 and cfg.objective != "sft":
        # the preference loss runs the (sharded) output layer once per chunk of completion tokens, a number
        # that differs between ranks: FSDP's gathers would not pair up across the ranks
        raise ValueError(f"objective {cfg.objective}: preference tuning trains in one process for now "
                         f"(got {world} processes); use --nproc 1")


def shard_for_group(model, cfg: TrainConfig, group: Group, log=print) -> dict:
    """Shard the model across `group` (several processes): the 4-bit base, the adapters, the
    embeddings, output layer and norms, 1/N each (qforge.dist.shard). Logs one line per component
    (whole MiB, each rank's MiB) and returns them for the summary."""
    from ..dist.shard import held_bytes, shard_base, whole_parameters
    if cfg.method != "qlora":
        raise ValueError(f"several processes train only --method qlora (the sharded 4-bit base); got {cfg.method}")
    if cfg.quant_type.startswith("hqq"):
        raise ValueError(f"several processes shard an nf4/fp4 base; quant_type {cfg.quant_type} (HQQ) trains in "
                         "one process")
    group.copy_from_rank0([p for p in model.parameters() if p.requires_grad])  # whole still: one start
    shard_base(model, group, storage_dtype=getattr(torch, cfg.compute_dtype))
    whole_names = whole_parameters(model)
    if whole_names:
        log(f"kept whole on every rank (their shards would cut the 8-bit optimiser's 256-value blocks): "
            f"{', '.join(whole_names[:5])}{' ...' if len(whole_names) > 5 else ''} ({len(whole_names)} in all)")
    held = held_bytes(model)  # the optimiser's state predicted: it has none before the first step
    by_rank = group.gather(held)
    if group.is_main:
        log(sharding_lines(group.world, by_rank))
    return {"processes": group.world, "quantised_bytes": held["base_whole"],
            "quantised_bytes_by_rank": [h["base"] for h in by_rank] if by_rank else [],
            "held_bytes_by_rank": by_rank, "kept_whole": whole_names}


def sharding_lines(world: int, by_rank: list[dict]) -> str:
    """One line per component: the whole model's MiB and each rank's."""
    from ..dist.held import COMPONENTS
    mib = 2 ** 20
    lines = [f"{world} processes, what each rank holds (MiB):"]
    for key in COMPONENTS:
        lines.append(f"  {key:<10} whole {by_rank[0][key + '_whole'] / mib:9.1f}   "
                     + ", ".join(f"rank {r} {h[key] / mib:.1f}" for r, h in enumerate(by_rank)))
    return "\n".join(lines)
