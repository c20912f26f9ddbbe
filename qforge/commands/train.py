"""Fine-tune a model on a JSONL dataset: QLoRA (4-bit base + LoRA), BF16 LoRA, or full fine-tuning.

Every setting can come from a YAML recipe (--config); its keys are the flag names (with _ or -),
and flags given on the command line override the recipe. Output (--output-dir): the adapter in
PEFT format (adapter/), metrics.jsonl, loss.png, checkpoints/ and summary.json.

Several processes (QLoRA with the 4-bit base sharded across them, FSDP2): --nproc N starts N on
this machine through torchrun; on several machines run torchrun yourself on each, with
`-m qforge.train` and the same flags. Only rank 0 writes files.

Examples:
  qforge train --data train.jsonl --max-steps 100
  qforge train --config configs/demo.yaml --method lora --lr 1e-4
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
    "model": "smollm2 (the embedded default), a model folder, a GGUF file or a 4-bit bitsandbytes folder",
    "data": "training JSONL: chat {messages}, instruction {instruction, input, output} or {text}",
    "eval_data": "validation JSONL (default: none, or --eval-fraction of the training rows)",
    "method": "qlora (4-bit base), lora (BF16 base) or full (every weight)",
    "target_modules": "all-linear, or comma-separated layer names such as q_proj,v_proj",
    "max_steps": "stop after this many optimiser steps (default: --epochs over the data)",
    "eval_every": "evaluate every N steps (0: only at the end when there is eval data)",
    "save_every": "write a checkpoint every N steps (0: none until the end or Ctrl-C)",
    "keep_base_outputs": "with gradient checkpointing, keep each adapted layer's frozen base product "
                         "for backward instead of dequantising and multiplying again (faster, more memory; "
                         "the planner's estimate counts it). Default: auto, on when the run's plan with it "
                         "fits in 80%% of the available memory (qforge.plan.AUTO_KEEP_SHARE)",
}
AUTO_BOOLS = {"keep_base_outputs"}  # bool settings whose default (None) means "decide at run time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes on this machine, started with torchrun; the 4-bit base is sharded "
                             "across them (default: 1; ignored when already under torchrun)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = HELP.get(f.name, "") if f.name in AUTO_BOOLS else f"{HELP.get(f.name, '')} (default: {default})".strip()
        if isinstance(default, bool) or f.name in AUTO_BOOLS:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.name in ("max_steps",):
                kind = int
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and v is not None}
    if isinstance(given.get("target_modules"), str) and given["target_modules"] != "all-linear":
        given["target_modules"] = [s.strip() for s in given["target_modules"].split(",") if s.strip()]
    return TrainConfig.from_yaml(args.config, given) if args.config else TrainConfig(**given)


def run(args: argparse.Namespace) -> int:
    from ..dist import RankLost, close_group, init_group, launched_by_torchrun
    from ..train.loop import TrainingDiverged
    from ..train.run import run_training

    cfg = config_from_args(args)
    if getattr(args, "nproc", 1) > 1 and not launched_by_torchrun():
        return launch(cfg, args.nproc)
    group = init_group()
    try:
        result, summary = run_training(cfg, group=group)
    except TrainingDiverged as exc:
        if group.is_main:
            print(f"qforge train: stopped: {exc}")
        return 3
    except RankLost as exc:
        print(f"qforge train: {exc}", file=sys.stderr, flush=True)
        return 4
    except RuntimeError as exc:  # FSDP's own collectives, inside forward and backward
        if group.distributed and isinstance(exc, _dist_error()):
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


def _dist_error() -> type:
    import torch.distributed
    return torch.distributed.DistError


def launch(cfg: TrainConfig, nproc: int) -> int:
    """Run this training in `nproc` processes on this machine: torchrun (standalone rendezvous)
    starts `python -m qforge.train` per rank on the resolved recipe, and stops the others if one
    dies. Returns torchrun's exit status."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "config.yaml"
    recipe.write_text(cfg.to_yaml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qforge.train", "--config", str(recipe)]
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
