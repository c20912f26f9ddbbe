"""Fine-tune a model on a JSONL dataset: QLoRA (4-bit base + LoRA), BF16 LoRA, or full fine-tuning.

Every setting can come from a YAML recipe (--config); its keys are the flag names (with _ or -),
and flags given on the command line override the recipe. Output (--output-dir): the adapter in
PEFT format (adapter/), metrics.jsonl, loss.png, checkpoints/ and summary.json.

Examples:
  qforge train --data train.jsonl --max-steps 100
  qforge train --config configs/demo.yaml --method lora --lr 1e-4
  qforge train --config configs/demo.yaml --resume        # continue from the last checkpoint
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..train.config import TrainConfig

HELP = {
    "model": "smollm2 (the embedded default), a model folder, a GGUF file or a 4-bit bitsandbytes folder",
    "data": "training JSONL: chat {messages}, instruction {instruction, input, output} or {text}",
    "eval_data": "validation JSONL (default: none, or --eval-fraction of the training rows)",
    "method": "qlora (4-bit base), lora (BF16 base) or full (every weight)",
    "target_modules": "all-linear, or comma-separated layer names such as q_proj,v_proj",
    "max_steps": "stop after this many optimiser steps (default: --epochs over the data)",
    "eval_every": "evaluate every N steps (0: only at the end when there is eval data)",
    "save_every": "write a checkpoint every N steps (0: none until the end or Ctrl-C)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{HELP.get(f.name, '')} (default: {default})".strip()
        if isinstance(default, bool):
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
    from ..train.loop import TrainingDiverged
    from ..train.run import run_training

    cfg = config_from_args(args)
    try:
        result, summary = run_training(cfg)
    except TrainingDiverged as exc:
        print(f"qforge train: stopped: {exc}")
        return 3
    print("\nsummary:\n" + json.dumps(summary, indent=2))
    print(f"loss curve: {cfg.output_dir}/loss.png   metrics: {cfg.output_dir}/metrics.jsonl")
    return 130 if result.interrupted else 0
