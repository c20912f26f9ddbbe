r"""Fine-tune a model on a JSONL dataset: QLoRA (4-bit base + LoRA), BF16 LoRA, or full fine-tuning.

Every setting can come from a YAML recipe (--config): qforge's own (its keys are the flag names,
with _ or -), an Axolotl config or a LLaMA-Factory config (told apart by their keys; see
qforge.train.recipes; --print-config shows what it became). Flags given on the command line
override the recipe. Data: JSONL, JSON, Parquet, CSV or a saved `datasets` folder of chat,
ShareGPT, instruction (Alpaca), prompt/completion or text rows. --model takes a Hugging Face Hub
id too (ORG/NAME; the local cache first). Output (--output-dir): the adapter in PEFT format with
the tokenizer and its chat template (adapter/), metrics.jsonl, loss.png, checkpoints/,
summary.json, and TensorBoard / W&B logs with --report-to.

Several processes (QLoRA with the 4-bit base sharded across them, FSDP2): --nproc N starts N on
this machine through torchrun; on several machines run torchrun yourself on each, with
`-m qforge.train` and the same flags. Only rank 0 writes files.

Preference tuning (--objective dpo|orpo, or --method dpo|orpo for QLoRA): --data holds preference
pairs (OpenAI's preference JSONL, TRL's prompt/chosen/rejected, ShareGPT chosen/rejected pairs);
--batch-size counts pairs; --adapter DIR continues an adapter (an SFT run's, its shape from its
adapter_config.json); DPO's reference is the base with the adapters off, or --ref-adapter DIR.
Every step's metrics.jsonl record carries TRL's rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/* (and eval_ ones when evaluated).

Examples:
  qforge train --data train.jsonl --max-steps 100
  qforge train --data chats.jsonl --max-steps 20 --output-dir runs/sft
  qforge train --method dpo --data pairs.jsonl --adapter runs/sft/adapter --ref-adapter runs/sft/adapter \
      --beta 0.1 --max-steps 20 --output-dir runs/dpo       # DPO from the SFT adapter, SFT as the reference
  qforge train --config configs/demo.yaml --method lora --lr 1e-4
  qforge train --config configs/axolotl-qlora.yaml --print-config   # an Axolotl config as a qforge recipe
  qforge train --model HuggingFaceTB/SmolLM2-135M-Instruct --data chats.parquet --report-to tensorboard
  qforge train --config configs/demo.yaml --resume        # continue from the last checkpoint
  qforge train --config configs/demo.yaml --nproc 2       # two processes (gloo on CPU, NCCL on GPUs)
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
      -m qforge.train --config configs/llama-70b-qlora.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from ..train.config import TrainConfig

HELP = {
    "device": "where the run trains: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N",
    "model": "smollm2 (the embedded default), a model folder, a GGUF file, a 4-bit bitsandbytes folder or a "
             "Hugging Face Hub id ORG/NAME (the local cache first; HF_HUB_OFFLINE=1 never downloads)",
    "revision": "branch, tag or commit of a Hub model id",
    "data": "training data: .jsonl, .json, .parquet, .csv or a datasets folder (save_to_disk) of chat {messages}, "
            "ShareGPT {conversations}, instruction {instruction, input, output}, {prompt, completion} or {text} rows",
    "eval_data": "validation data, same kinds (default: none, the eval split of a saved DatasetDict, or "
                 "--eval-fraction of the training rows)",
    "eval_fraction": "share of the training rows held out for evaluation by a seeded shuffle",
    "data_format": "row shape: auto (from the first row), chat, sharegpt, instruction, completion or text",
    "train_on": "assistant (only the answers are trained) or all (every token)",
    "max_samples": "use only the first N training rows",
    "chat_template": "chat template for the rows: a built-in (chatml, llama3, gemma, mistral, qwen, phi3) or a "
                     "Jinja file; saved with the adapter's tokenizer (default: the tokenizer's own)",
    "rank": "LoRA rank r", "alpha": "LoRA alpha (scaling alpha/r)", "dropout": "dropout on the LoRA input",
    "use_rslora": "rank-stabilised LoRA scaling alpha/sqrt(r)", "use_dora": "DoRA (weight-decomposed LoRA)",
    "loftq_iters": "LoftQ initialisation iterations (0: plain LoRA initialisation)",
    "quant_type": "data type of the qlora base: nf4 or fp4 (4-bit, bitsandbytes' layout), or hqq4, hqq3, hqq2 "
                  "(HQQ at 4, 3 or 2 bits, a scale and zero-point per --hqq-group-size values)",
    "hqq_group_size": "values per HQQ scale and zero-point (quant_type hqq4/hqq3/hqq2); must divide each weight", "double_quant": "quantise the 4-bit scales too",
    "compute_dtype": "dtype of the computation: bfloat16, float16 or float32",
    "adapter_dtype": "dtype the LoRA weights are kept, updated and saved in: float32 (as PEFT; every optimiser "
                     "update kept) or bfloat16 (half the adapter memory; updates under half a BF16 ulp are lost); "
                     "the products run in --compute-dtype either way",
    "residual_dtype": "dtype of the residual stream between layers: auto (default: float32 for qlora and lora, "
                      "bfloat16 for full), bfloat16 (faster, ~4-7%% higher eval loss on the demo task), or float32 "
                      "as PEFT's prepare_model_for_kbit_training gives it (embeddings, norms and the adapted layers' outputs in "
                      "float32; the products stay in --compute-dtype). Costs the embeddings in float32 (+2 bytes per "
                      "element: +1 GB for Llama 3 8B's, +2 GB with an untied head in PEFT's recipe; qforge leaves "
                      "an untied head as it is) and float32 hidden states (twice the residual's activations)",
    "optimizer": "paged_adamw_8bit, adamw_8bit or adamw (32-bit state)", "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay", "lr_scheduler": "decay after warmup: cosine, linear or constant",
    "warmup_ratio": "share of the steps spent in linear warmup",
    "warmup_steps": "warmup steps (default: none, warmup_ratio decides)",
    "min_lr_ratio": "learning-rate floor at the end, as a share of --lr",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)", "epochs": "passes over the training data",
    "batch_size": "rows per micro-batch", "grad_accum": "micro-batches per optimiser step",
    "max_seq_len": "tokens per row; longer rows keep their start", "pack": "pack several rows into each sequence",
    "gradient_checkpointing": "recompute activations in backward to save memory",
    "offload_activations": "keep what forward saves for backward in host memory (pinned; copied back for "
                           "backward) instead of on the GPU; on the CPU activations live in host memory "
                           "already and this changes nothing (the log says so)",
    "offload_base": "qlora: keep the 4-bit base (MoE expert banks too) in host memory (pinned) and bring each "
                    "transformer block's codes to the GPU just before its forward and backward, the next block's copy started while "
                    "the current one computes: the GPU holds two blocks of base, plus adapters, optimiser state "
                    "and activations. For a base larger than the GPU; one process only (not with --nproc > 1); "
                    "on the CPU it runs the same copies host to host and saves nothing",
    "log_every": "log every N steps", "seed": "seed of the data order and the adapters' initial values",
    "output_dir": "where the adapter, metrics, checkpoints and logs go",
    "resume": "continue from the last checkpoint in --output-dir",
    "report_to": "experiment tracking, comma-separated: tensorboard (events in OUTPUT_DIR/tensorboard), wandb "
                 "(offline unless logged in), none; metrics.jsonl and loss.png are always written",
    "method": "qlora (4-bit base), lora (BF16 base) or full (every weight); dpo and orpo are shorthands for "
              "--method qlora --objective dpo|orpo",
    "objective": "what the run learns from: sft (demonstrations), dpo (preference pairs, against a reference: "
                 "the base with the adapters off, or --ref-adapter) or orpo (preference pairs, no reference)",
    "beta": "dpo: strength of the reference (TRL's beta); orpo: weight of the odds-ratio term (TRL's beta, "
            "the paper's lambda)",
    "label_smoothing": "dpo: share of the pairs assumed mislabelled (conservative DPO), in [0, 0.5)",
    "ref_adapter": "dpo: an adapter folder on the same base as the reference model (default: none, the base "
                   "itself with the adapters off)",
    "adapter": "an adapter folder to continue training from, e.g. an SFT adapter before dpo (default: none, "
               "fresh adapters)",
    "target_modules": "all-linear, or comma-separated layer names such as q_proj,v_proj",
    "max_steps": "stop after this many optimiser steps (default: --epochs over the data)",
    "eval_every": "evaluate every N steps (0: only at the end when there is eval data)",
    "save_every": "write a checkpoint every N steps (0: none until the end or Ctrl-C)",
    "keep_base_outputs": "with gradient checkpointing, keep each adapted layer's frozen base product "
                         "for backward instead of dequantising and multiplying again (faster, more memory; "
                         "the planner's estimate counts it). Default: auto, on when the run's plan with it "
                         "fits in 80%% of the available memory (qforge.plan.AUTO_KEEP_SHARE)",
}
HELP.update({
    "field_map": "your keys -> qforge's, comma-separated KEY=TARGET: a role (question=user,answer=assistant makes a "
                 "chat), a row key (instruction, input, output, prompt, completion, text, messages, conversations) "
                 "or a turn key (speaker=role,text=content)",
    "evals_per_epoch": "evaluate this many times per epoch (Axolotl's evals_per_epoch; --eval-every wins)",
    "saves_per_epoch": "write this many checkpoints per epoch (Axolotl's saves_per_epoch; --save-every wins)",
    "wandb_project": "Weights & Biases project (with --report-to wandb; default: none, the project 'qforge')",
    "wandb_entity": "Weights & Biases team or user the run is logged under (default: none, your default entity)",
    "wandb_name": "Weights & Biases run name (default: none, W&B picks one)",
    "wandb_mode": "Weights & Biases mode (default: none, online when logged in, else offline)",
    "save_every": "write a checkpoint every N steps; 0: none until the end or Ctrl-C (default: none, every 10%% of "
                  "the run's steps)",
    "resume": "continue from the last checkpoint in --output-dir (its adapter is replaced at the end)",
})
AUTO_BOOLS = {"keep_base_outputs"}  # bool settings whose default (None) means "decide at run time"

# --help in groups, each setting under one heading
GROUPS = {
    "data": ("data", "eval_data", "eval_fraction", "data_format", "field_map", "train_on", "max_samples",
             "chat_template", "max_seq_len", "pack"),
    "model": ("model", "revision", "quant_type", "double_quant", "hqq_group_size", "compute_dtype", "adapter_dtype",
              "residual_dtype"),
    "method": ("method", "objective", "beta", "label_smoothing", "ref_adapter", "adapter", "rank", "alpha", "dropout",
               "target_modules", "use_rslora", "use_dora", "loftq_iters"),
    "training": ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_ratio",
                 "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm", "optimizer", "seed", "eval_every",
                 "evals_per_epoch"),
    "output": ("output_dir", "save_every", "saves_per_epoch", "resume", "log_every"),
    "tracking": ("report_to", "wandb_project", "wandb_entity", "wandb_name", "wandb_mode"),
    "hardware": ("device", "gradient_checkpointing", "keep_base_outputs", "offload_activations", "offload_base"),
}


# open-ended settings whose usual values are shown in the usage line
METAVARS = {"report_to": "{tensorboard,wandb,none}[,...]", "device": "{auto,cpu,cuda,cuda:N}",
            "chat_template": "{chatml,llama3,gemma,mistral,qwen,phi3}|FILE.jinja",
            "target_modules": "{all-linear}|NAME[,NAME...]", "field_map": "KEY=TARGET[,...]"}


def _choices() -> dict:
    """Settings with a fixed set of values: argparse shows them as {a,b,c} and refuses others."""
    from ..train import config as c
    from ..train.data import FORMATS
    return {"method": (*c.METHODS, *PREFERENCE_METHODS), "objective": c.OBJECTIVES, "quant_type": c.QUANT_TYPES,
            "compute_dtype": c.COMPUTE_DTYPES, "adapter_dtype": c.ADAPTER_DTYPES, "residual_dtype": c.RESIDUAL_DTYPES,
            "optimizer": c.OPTIMIZERS, "lr_scheduler": c.LR_SCHEDULERS, "data_format": ("auto", *FORMATS),
            "train_on": c.TRAIN_ON, "wandb_mode": c.WANDB_MODES}


# what a flag's value must be, said in argparse's one-line error ("expected a number > 0, got 'fast'")
def _types() -> dict:
    from .argtypes import checked, fraction_0_1, non_negative_int, positive_int
    number = checked(float, lambda v: True, "a number")
    positive = checked(float, lambda v: v > 0, "a number > 0, such as 2e-4")
    return {"lr": positive, "alpha": positive, "beta": positive, "rank": positive_int, "batch_size": positive_int,
            "grad_accum": positive_int, "epochs": positive_int, "max_seq_len": positive_int, "max_steps": positive_int,
            "max_samples": positive_int, "hqq_group_size": positive_int, "log_every": positive_int,
            "evals_per_epoch": positive_int, "saves_per_epoch": positive_int, "warmup_steps": non_negative_int,
            "loftq_iters": non_negative_int, "eval_every": non_negative_int, "save_every": non_negative_int,
            "seed": non_negative_int, "eval_fraction": fraction_0_1, "warmup_ratio": fraction_0_1,
            "min_lr_ratio": checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), "dropout": fraction_0_1, "label_smoothing": fraction_0_1,
            "weight_decay": number, "max_grad_norm": number}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    parser.add_argument("--config", help="YAML recipe: qforge's own, Axolotl's or LLaMA-Factory's (see configs/; "
                                         "default: none)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the qforge recipe the settings make (from --config and the flags) and exit "
                             "(default: off)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every set-up line (what was loaded, the data report, the checkpointing choice) "
                             "and other libraries' deprecation warnings (default: off)")
    groups["output"].add_argument("--overwrite", action="store_true",
                                  help="replace the adapter and checkpoints an earlier run left in --output-dir "
                                       "(without it, or --resume, they are kept and the run stops) (default: off)")
    groups["hardware"].add_argument("--nproc", type=int, default=1,
                                    help="processes on this machine, started with torchrun; the 4-bit base is "
                                         "sharded across them (default: 1; ignored when already under torchrun)")
    defaults, choices, types = TrainConfig(), _choices(), _types()
    group_of = {name: group for group, names in GROUPS.items() for name in names}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = HELP.get(f.name, "")
        if f.name not in AUTO_BOOLS and "default:" not in help_text.lower():  # else the help says it
            shown = "none" if default is None else {False: "off", True: "on"}.get(default, default) \
                if isinstance(default, bool) or default is None else default
            help_text = f"{help_text} (default: {shown})".strip()
        target = groups[group_of[f.name]] if f.name in group_of else parser
        if isinstance(default, bool) or f.name in AUTO_BOOLS:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = types.get(f.name, {int: int, float: float}.get(type(default), str))
            target.add_argument(flag, type=kind, default=None, help=help_text, choices=choices.get(f.name),
                                metavar=METAVARS.get(f.name))


PREFERENCE_METHODS = ("dpo", "orpo")  # --method dpo|orpo: --method qlora --objective dpo|orpo


def method_shorthand(given: dict) -> dict:
    """--method dpo|orpo -> method qlora with objective dpo|orpo (TrainConfig keeps the two apart);
    a ValueError when --objective says otherwise."""
    method = given.get("method")
    if method not in PREFERENCE_METHODS:
        return given
    if given.get("objective", method) != method:
        raise ValueError(f"--method {method} is --method qlora --objective {method}, but --objective is "
                         f"{given['objective']}")
    return {**given, "method": "qlora", "objective": method}


def config_and_recipe(args: argparse.Namespace):
    """(TrainConfig, Recipe or None): the recipe file of any dialect, flags given on the command line winning."""
    from ..train.recipes import load_config
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and v is not None}
    given = method_shorthand(given)
    if isinstance(given.get("target_modules"), str) and given["target_modules"] != "all-linear":
        given["target_modules"] = [s.strip() for s in given["target_modules"].split(",") if s.strip()]
    if args.config:
        return load_config(args.config, given)
    return TrainConfig(**given), None


def run(args: argparse.Namespace) -> int:
    from ..dist import RankLost, close_group, init_group, launched_by_torchrun, lost_contact
    from ..train.loop import TrainingDiverged
    from ..train.preflight import check_existing_adapter

    verbose = getattr(args, "verbose", False)
    quiet_warnings(verbose)
    cfg, recipe = config_and_recipe(args)
    if getattr(args, "print_config", False):
        from ..train.recipes import Recipe, print_config
        print(print_config(cfg, recipe or Recipe("qforge", {}), args.config or "the command line"), end="")
        return 0
    if getattr(args, "nproc", 1) > 1 and not launched_by_torchrun():
        from ..devices import resolve_device
        from ..train.run import check_processes
        check_processes(cfg, args.nproc)  # one line here, not one per rank
        resolve_device(cfg.device)  # --device cuda without a GPU: one line here, not one per rank
        check_existing_adapter(cfg, getattr(args, "overwrite", False))
        return launch(cfg, args.nproc)
    group = init_group(device_kind=cfg.device)  # cuda: NCCL, one GPU per rank (LOCAL_RANK); cpu: gloo
    try:
        if group.is_main:
            check_existing_adapter(cfg, getattr(args, "overwrite", False))
        result, summary = train_and_save(cfg, group, verbose, getattr(args, "overwrite", False))
    except TrainingDiverged as exc:
        if group.is_main:
            print(f"qforge train: stopped: {exc}")
        return 3
    except RankLost as exc:
        print(f"qforge train: {exc}", file=sys.stderr, flush=True)
        return 4
    except RuntimeError as exc:  # FSDP's own collectives, inside forward and backward
        if group.distributed and lost_contact(exc):
            print(f"qforge train: rank {group.rank} of {group.world}: lost contact with another rank: "
                  f"{str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
            return 4
        raise
    finally:
        close_group(group)
    if group.is_main:
        print("\nsummary:\n" + json.dumps(summary, indent=2))
        print(f"loss curve: {cfg.output_dir}/loss.png   metrics: {cfg.output_dir}/metrics.jsonl")
    return 130 if result.interrupted else 0


def quiet_warnings(verbose: bool) -> None:
    """Other libraries' deprecation and future warnings (transformers' gradient_checkpointing_enable
    ...) say nothing a qforge user can act on: hidden unless --verbose."""
    import warnings
    if not verbose:
        for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass


def first_line(run) -> str:
    """The run in one plain line: 'training qlora on smollm2: 4.9M trainable parameters, 20 rows, 3 steps'."""
    from ..train.loop import total_steps_for
    cfg, report = run.cfg, run.data_report
    what = cfg.method if cfg.objective == "sft" else f"{cfg.method} {cfg.objective}"
    rows = getattr(report, "train_rows", None) or len(run.train_set)
    unit = "rows" if cfg.objective == "sft" else "pairs"
    extra = f", {report.truncated} truncated at {cfg.max_seq_len} tokens" if getattr(report, "truncated", 0) else ""
    if getattr(report, "dropped_no_trainable", 0):
        extra += f", {report.dropped_no_trainable} dropped (no trained token)"
    return (f"training {what} on {cfg.model}: {_millions(run.trainable_parameters)} trainable parameters, "
            f"{rows} {unit}, {total_steps_for(len(run.train_set), cfg)} steps{extra}")


def _millions(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else (f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}")


def train_and_save(cfg: TrainConfig, group, verbose: bool, overwrite: bool = False):
    """prepare (set-up lines only with --verbose), the plain first line, train, save: (result, summary).
    With `overwrite` (and no resume) the earlier run's checkpoints go once this one has loaded."""
    from ..train.preflight import clear_earlier_run
    from ..train.run import prepare
    run = prepare(cfg, group=group, detail=print if verbose else (lambda *_: None))
    if group.is_main:
        if overwrite and not cfg.resume:
            clear_earlier_run(cfg.output_dir)
        print(first_line(run), flush=True)
    result = run.train()
    return result, run.save()


def launch(cfg: TrainConfig, nproc: int) -> int:
    """Run this training in `nproc` processes on this machine: torchrun (standalone rendezvous)
    starts `python -m qforge.train` per rank on the resolved recipe, and stops the others if one
    dies. Returns torchrun's exit status."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "config.yaml"
    recipe.write_text(cfg.to_yaml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qforge.train", "--config", str(recipe), "--overwrite"]  # the launcher checked the folder
    print(f"qforge train: {nproc} processes: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # torchrun got the same Ctrl-C and passes it to the ranks, which checkpoint
            continue
    if rc not in (0, 130):
        print(f"qforge train: the {nproc}-process run failed (torchrun exit status {rc}); "
              f"torchrun's report above names the rank that failed first", file=sys.stderr)
    return rc
