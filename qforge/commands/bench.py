"""Compare fine-tuning methods on one task: QLoRA (NF4 / FP4), BF16 LoRA, full, QDoRA, LoftQ.

  qforge bench                                   # the embedded SmolLM2 on the demo task, all methods
  qforge bench --methods qlora,lora --max-steps 40 --output-dir runs/bench
  qforge bench --config bench.yaml --data train.jsonl --eval-data val.jsonl --test-data test.jsonl

Each method trains with the same data order, steps and seed, in a fresh process (so its peak
memory is its own), and is reported with its final eval loss, perplexity, held-out exact-match
accuracy (when the test rows are chat rows answered by a JSON object, as in the demo task), peak
memory, training tokens per second, wall time and the size of what it leaves on disk (the PEFT
adapter; for full fine-tuning the model in BF16). A --config YAML holds TrainConfig keys (the
recipe shared by every method) and the bench's own keys: methods, test_data, test_rows,
full_lr_scale. Flags win over the YAML. Writes bench.md, bench.json and bench_eval_loss.png
under --output-dir. Method definitions and the full fine-tuning learning rate: qforge/eval/bench.py.

  qforge bench --preference [--max-steps 20] [--output-dir runs/preference]

runs the preference task instead (qforge/eval/preference_bench.py): the demo task as pairs (the right
JSON preferred over the same JSON with one field wrong), SFT --max-steps steps, then DPO as many
steps from that adapter with it as the reference; held-out reward accuracy, mean margin, plain
preference and exact match for SFT alone and SFT+DPO, and each phase's training peak memory.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..eval.bench import BENCH_METHODS, BENCH_RECIPE
    parser.add_argument("--config", help="YAML: TrainConfig keys plus methods, test_data, test_rows, full_lr_scale")
    parser.add_argument("--model", help="smollm2 (default), a model folder or a GGUF file")
    parser.add_argument("--data", help="training JSONL (default: the demo task's train.jsonl)")
    parser.add_argument("--eval-data", help="validation JSONL (default: the demo task's val.jsonl with the demo "
                                            "data, else 10%% of --data)")
    parser.add_argument("--test-data", help="held-out JSONL for exact match (default: the demo task's test.jsonl "
                                            "with the demo data, else none)")
    parser.add_argument("--test-rows", type=int, help="held-out rows generated per method (default 100)")
    parser.add_argument("--methods", help=f"comma-separated, from {','.join(BENCH_METHODS)} (default: all)")
    parser.add_argument("--max-steps", type=int,
                        help=f"optimiser steps per method (default {BENCH_RECIPE['max_steps']})")
    parser.add_argument("--eval-every", type=int,
                        help=f"eval-loss curve spacing in steps (default {BENCH_RECIPE['eval_every']})")
    parser.add_argument("--seed", type=int, help="seed shared by every method (default 0)")
    parser.add_argument("--eval-tasks", default=None,
                        help="after training, run these lm-eval tasks (comma-separated, e.g. qforge_extract) on the "
                             "base and every method's adapter through one server; writes eval/ under the output "
                             "folder (default: none)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="with --eval-tasks: documents per task (default: all)")
    parser.add_argument("--output-dir", default=None,
                        help="where bench.md, bench.json and the PNG go (default runs/bench)")
    parser.add_argument("--preference", action="store_true",
                        help="run the preference task (SFT then DPO from its adapter, against SFT alone) instead of "
                             "the methods; takes --model, --max-steps, --test-rows, --device, --output-dir "
                             "(default: off)")
    parser.add_argument("--device", default=None,
                        help="where every method runs: auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or "
                             "cuda:N (default: auto)")


def bench_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """(recipe of TrainConfig keys, bench settings) from the defaults, the YAML and the flags."""
    from ..eval.bench import BENCH_KEYS, BENCH_METHODS, FULL_LR_SCALE, default_recipe
    from ..train.config import TrainConfig
    from ..eval.tasks import demo_task_paths

    given: dict = {}
    if args.config:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        given = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(given) - set(TrainConfig.field_names()) - set(BENCH_KEYS))
        if unknown:
            raise ValueError(f"{args.config}: unknown setting(s) {unknown}")
    for key in ("model", "data", "eval_data", "test_data", "test_rows", "methods", "max_steps", "eval_every",
                "seed", "output_dir", "device"):
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    bench = {k: given.pop(k) for k in BENCH_KEYS if k in given}
    recipe = default_recipe()
    demo = demo_task_paths()
    if "data" in given and Path(given["data"]).resolve() != demo["train"].resolve():
        recipe.pop("eval_data")  # the demo's val split says nothing about other data
        bench.setdefault("test_data", None)
    recipe.update(given)
    recipe.setdefault("output_dir", "runs/bench")
    methods = bench.get("methods", ",".join(BENCH_METHODS))
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    bench["methods"] = list(methods)
    bench.setdefault("test_data", str(demo["test"]))
    bench.setdefault("test_rows", 100)
    bench.setdefault("full_lr_scale", FULL_LR_SCALE)
    return recipe, bench


def run_preference(args: argparse.Namespace) -> int:
    from ..eval.preference_bench import run_preference_bench
    out = args.output_dir or "runs/preference"
    report = run_preference_bench(out, model=args.model, steps=args.max_steps, test_rows=args.test_rows,
                                  device=args.device)
    print("\n" + report["table"] + "\n\n" + report["line"])
    print(f"table: {Path(out) / 'preference.md'}   figures: {Path(out) / 'preference.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..eval.bench import format_table, run_bench

    if getattr(args, "preference", False):
        return run_preference(args)

    recipe, bench = bench_settings(args)
    out = Path(recipe.pop("output_dir"))
    print(f"bench: {', '.join(bench['methods'])} on {recipe['model']}, {recipe['max_steps']} steps of batch "
          f"{recipe['batch_size']}, seed {recipe['seed']}; output in {out}")
    records = run_bench(recipe, bench["methods"], out, bench["test_data"], bench["test_rows"], bench["full_lr_scale"])
    print("\n" + format_table(records))
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        best = min(ok, key=lambda r: r["final_eval_loss"])
        smallest = min(ok, key=lambda r: r["peak_memory_bytes"])
        print(f"\nsummary: lowest eval loss {best['method']} ({best['final_eval_loss']:.4f}); least memory "
              f"{smallest['method']} ({smallest['peak_memory_bytes'] / 1e9:.2f} GB); "
              f"{sum(r['status'] != 'ok' for r in records)} method(s) did not run")
    print(f"table: {out / 'bench.md'}   figures: {out / 'bench.json'}   curves: {out / 'bench_eval_loss.png'}")
    if getattr(args, "eval_tasks", None):
        bench_eval(records, recipe["model"], args.eval_tasks, out / "eval", args.eval_limit)
    return 0 if all(r["status"] in ("ok", "unsupported") for r in records) else 1


OWN_BASE_METHODS = ("loftq",)  # its adapter starts from its own requantised base, which no server rebuilds


def bench_eval(records: list[dict], base: str, tasks: str, out: Path, limit: int | None) -> dict:
    """lm-eval over the base and what every method trained, each on the base it was trained on (one
    server per base: QLoRA's adapters on NF4/FP4/HQQ, BF16 LoRA's on the dense base, full
    fine-tuning's model served densely); one table. LoftQ (its own requantised base) is left out."""
    from .eval import evaluate_adapters

    ok = [r for r in records if r["status"] == "ok" and r["method"] not in OWN_BASE_METHODS]
    adapters = {r["method"]: r["adapter_dir"] for r in ok if r.get("adapter_dir")}
    full = {r["method"]: r["model_dir"] for r in ok if r.get("model_dir")}
    if not adapters and not full:
        print("bench: --eval-tasks: nothing to evaluate")
        return {}
    return evaluate_adapters(base, adapters, [t.strip() for t in tasks.split(",") if t.strip()], out, limit,
                             full=full)
