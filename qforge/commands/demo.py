"""Run the main job on the embedded SmolLM2-135M-Instruct model: QLoRA-fine-tune it on a task it
fails, and show that it learnt it.

1. Fidelity of the 4-bit formats on the model's own weights (NF4 vs FP4 vs INT4).
2. Load the model with its linear weights in NF4 (double-quantised) and LoRA adapters on every
   linear layer; measure held-out exact-match accuracy on the demo task (sentences -> JSON).
3. Train the adapters with the paged 8-bit AdamW (recipe: configs/demo.yaml).
4. Measure accuracy again, show generations before/after side by side, save the adapter (PEFT
   format), metrics.jsonl, loss.png and summary.json under --output-dir.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..devices import add_device_argument
from ..eval.tasks import demo_recipe

DEMO_RECIPE = demo_recipe()  # qforge/data/demo.yaml (= configs/demo.yaml): one home for the recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where the adapter and metrics go (default runs/demo)")
    parser.add_argument("--max-steps", type=int, default=None, help=f"training steps (default {DEMO_RECIPE['max_steps']})")
    parser.add_argument("--eval-rows", type=int, default=100, help="held-out rows scored before and after (default 100)")
    parser.add_argument("--skip-fidelity", action="store_true", help="skip the 4-bit fidelity table")
    parser.add_argument("--verbose", action="store_true",
                        help="show other libraries' deprecation warnings too (default: off)")
    add_device_argument(parser)


def accuracy(model, tok, rows, dtype) -> tuple[float, list[str]]:
    from ..eval.generate import generate_chat
    from ..eval.tasks import exact_match, prompt_messages
    replies = generate_chat(model, tok, [prompt_messages(r) for r in rows], max_new_tokens=40, compute_dtype=dtype)
    return sum(exact_match(p, r) for p, r in zip(replies, rows)) / len(rows), replies


def demo_config(args: argparse.Namespace):
    """The demo recipe (every setting of it: data format, train_on, packing, eval split ...) with
    the command's output folder, step count and device."""
    from ..train.config import TrainConfig
    recipe = dict(DEMO_RECIPE, output_dir=str(args.output_dir), device=args.device)
    if args.max_steps:
        recipe["max_steps"] = args.max_steps
    return TrainConfig(**recipe)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.data import read_jsonl
    from ..train.run import prepare
    from ..eval.tasks import demo_task_paths, expected_object

    from .train import quiet_warnings
    quiet_warnings(getattr(args, "verbose", False))
    t_start = time.perf_counter()
    out = Path(args.output_dir)
    if not args.skip_fidelity:
        from ..model.embedded import smollm2_sample_weights
        from ..quant.fidelity import fidelity_table, format_table, standard_datasets
        print("== 1. 4-bit formats on SmolLM2-135M's weights (and on Gaussian / Student-t samples)\n")
        print(format_table(fidelity_table(standard_datasets(n=1 << 18, weights={"smollm2": smollm2_sample_weights()}))) + "\n")

    cfg = demo_config(args)
    print("== 2. Loading SmolLM2-135M-Instruct with NF4 + double quant and LoRA r=16 on every linear layer")
    t0 = time.perf_counter()
    run = prepare(cfg, log=lambda message: print(f"   {message}"))  # the device decided once, in there
    model, tok, cfg = run.model, run.tokenizer, run.cfg
    dtype = getattr(torch, cfg.compute_dtype)
    test_rows = read_jsonl(demo_task_paths()["test"])[: args.eval_rows]
    acc_before, replies_before = accuracy(model, tok, test_rows, dtype)
    print(f"   loaded in {time.perf_counter() - t0:.1f} s; exact match before training: {acc_before:.0%} "
          f"of {len(test_rows)} held-out rows\n")

    print(f"== 3. Training {cfg.max_steps} steps (batch {cfg.batch_size}, lr {cfg.lr}, paged 8-bit AdamW)")
    result = run.train()
    acc_after, replies_after = accuracy(model, tok, test_rows, dtype)
    summary = run.save()  # the adapter (PEFT format) and summary.json

    print("\n== 4. Before and after, on held-out sentences\n")
    for row, before, after in list(zip(test_rows, replies_before, replies_after))[:4]:
        print(f"   input:    {row['messages'][1]['content']}")
        print(f"   expected: {json.dumps(expected_object(row))}")
        print(f"   before:   {before.strip()[:110]!r}")
        print(f"   after:    {after.strip()[:110]!r}\n")
    summary.update({"exact_match_before": acc_before, "exact_match_after": acc_after, "test_rows": len(test_rows),
                    "steps": len(result.losses), "eval_losses": result.eval_losses,
                    "train_seconds": round(result.seconds, 1), "data": str(run.data_report),
                    "total_seconds": round(time.perf_counter() - t_start, 1), "adapter": str(out / "adapter")})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: exact match {acc_before:.0%} -> {acc_after:.0%} ({(acc_after - acc_before) * 100:+.0f} points); "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; {summary['tokens_per_second']} tokens/s; "
          f"total {summary['total_seconds']:.0f} s")
    print(f"adapter (PEFT format): {out / 'adapter'}   loss curve: {out / 'loss.png'}")
    return 0
