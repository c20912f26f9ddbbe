"""The method bench: one supervised task, the same steps, data order and seed, trained once per
method, each in a fresh process so that its peak memory is its own.

    method      TrainConfig settings over the shared recipe (BENCH_RECIPE)
    qlora       method qlora, NF4, double quantisation
    qlora-fp4   method qlora, FP4, double quantisation (only the 4-bit data type differs)
    qlora-hqq4  method qlora over an HQQ base: 4 bits, group 64, float16 scale and zero (4.5 bits/param)
    qlora-hqq3  the same at 3 bits (3.7 bits/param: ten codes per int32)
    qlora-hqq2  the same at 2 bits (2.5 bits/param)
    lora        method lora: the same adapters on a frozen BF16 base
    full        method full: every weight trained, same 8-bit AdamW, lr * FULL_LR_SCALE
    qdora       qlora + use_dora
    loftq       qlora + loftq_iters 2 (needs the loader to LoftQ-initialise; reported when it does not)

Per method: the eval loss every `eval_every` steps (and at step 0), the final eval loss and its
perplexity exp(loss), the held-out exact-match accuracy when the test rows are chat rows whose
answer is a JSON object (the demo task), peak memory (the child's peak RSS from getrusage, or
torch.cuda.max_memory_allocated on a GPU), training tokens per second (evaluation time left
out), the child's wall time, and the adapter's size on disk as qforge.adapters.save_adapter
writes it (for full fine-tuning: the model's size in BF16, 2 bytes per distinct parameter).

Full fine-tuning's learning rate is the adapters' divided by 10 (FULL_LR_SCALE), with the same
paged 8-bit AdamW. The adapters' lr (1e-3, the demo recipe's) moves a zero-initialised low-rank
delta; Adam's steps are ~lr per element whatever the gradient, so the same lr on every weight of
the pretrained model would move each entry by a few percent of its size (SmolLM2's are ~0.02-0.05)
per step. lr/10 is the usual ratio between LoRA and full fine-tuning rates; it is not tuned here
(at 24 steps full fine-tuning ended at eval loss 0.026 against BF16 LoRA's 0.013).

Outputs under the output folder: bench.json (every figure, the eval curves, the recipe),
bench.md (the table) and bench_eval_loss.png (eval-loss curves of all methods); each method's
own folder holds its log, metrics.jsonl, loss.png and adapter.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from .tasks import demo_recipe, demo_task_paths

FULL_LR_SCALE = 0.1
METHOD_SETTINGS = {
    "qlora": {"method": "qlora", "quant_type": "nf4", "double_quant": True},
    "qlora-fp4": {"method": "qlora", "quant_type": "fp4", "double_quant": True},
    "qlora-hqq4": {"method": "qlora", "quant_type": "hqq4", "hqq_group_size": 64},
    "qlora-hqq3": {"method": "qlora", "quant_type": "hqq3", "hqq_group_size": 64},
    "qlora-hqq2": {"method": "qlora", "quant_type": "hqq2", "hqq_group_size": 64},
    "lora": {"method": "lora"},
    "full": {"method": "full"},
    "qdora": {"method": "qlora", "quant_type": "nf4", "double_quant": True, "use_dora": True},
    "loftq": {"method": "qlora", "quant_type": "nf4", "double_quant": True, "loftq_iters": 2},
}
BENCH_METHODS = tuple(METHOD_SETTINGS)
# The demo recipe (qforge/commands/demo.py) with evaluation every 10 steps and no checkpoints.
# The demo recipe (qforge/data/demo.yaml) without its method settings, shorter, no checkpoints.
BENCH_RECIPE = {k: v for k, v in demo_recipe().items()
                if k not in ("method", "quant_type", "double_quant", "hqq_group_size", "output_dir", "data", "eval_data")}
BENCH_RECIPE.update(max_steps=12, eval_every=4, save_every=0)
# Settings of the bench itself (the rest of a bench YAML are TrainConfig keys).
BENCH_KEYS = ("methods", "test_data", "test_rows", "full_lr_scale")
UNSUPPORTED_LOFTQ = "loftq: not supported by the loader yet"


def method_config(method: str, recipe: dict, output_dir: str | Path, full_lr_scale: float = FULL_LR_SCALE):
    """The TrainConfig of `method` over the shared `recipe` (a dict of TrainConfig keys)."""
    from ..train.config import TrainConfig

    if method not in METHOD_SETTINGS:
        raise ValueError(f"unknown bench method {method!r}: choose from {', '.join(BENCH_METHODS)}")
    settings = dict(recipe, **METHOD_SETTINGS[method], output_dir=str(output_dir))
    if method == "full":
        settings["lr"] = recipe.get("lr", 2e-4) * full_lr_scale
    # The bench evaluates from on_step (timed apart from training) and writes no checkpoints.
    settings["eval_every"], settings["save_every"] = 0, 0
    if not settings.get("eval_data") and not settings.get("eval_fraction"):
        settings["eval_fraction"] = 0.1  # an eval curve needs held-out rows
    return TrainConfig(**settings)


def is_json_task(rows: list[dict]) -> bool:
    """Whether exact match applies: every row is a chat row ending in an assistant JSON object."""
    from ..eval.tasks import first_json_object

    def answer(row):
        messages = row.get("messages") or [{}]
        last = messages[-1]
        return last.get("role") == "assistant" and first_json_object(str(last.get("content", ""))) is not None
    return bool(rows) and all(answer(r) for r in rows)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_memory_bytes(device) -> tuple[int, str]:
    """(bytes, what they are): CUDA's peak allocation on a GPU, else this process' peak RSS."""
    import resource

    import torch
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"  # Linux: KiB


def loftq_initialised(model) -> bool:
    """LoftQ starts B at the residual's SVD factor; plain LoRA init starts B at zero."""
    from ..model.surgery import adapter_parameters
    return any(bool(p.detach().abs().sum() > 0) for n, p in adapter_parameters(model) if "lora_B" in n)


def run_method(method: str, recipe: dict, output_dir: str | Path, test_data: str | None = None,
               test_rows: int = 100, full_lr_scale: float = FULL_LR_SCALE, log=print,
               initial_eval: bool = True) -> dict:
    """Train `method` in this process and measure it; returns the record bench.json keeps.

    eval_every (from `recipe`; 0: none between) sets the eval-curve spacing; the eval loss is also
    taken at the last step and, with initial_eval, at step 0. Training seconds leave out evaluation."""
    from ..train.loop import evaluate, total_steps_for
    from ..train.run import prepare

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = method_config(method, recipe, out, full_lr_scale)
    every = int(recipe.get("eval_every") or 0)
    record = {"method": method, "status": "ok", "lr": cfg.lr}
    t_start = time.perf_counter()
    run = prepare(cfg, log=lambda message: log(f"{method}: {message}"))
    model, tok, cfg, device, eval_set = run.model, run.tokenizer, run.cfg, run.device, run.eval_set
    if cfg.loftq_iters and not loftq_initialised(model):
        return dict(record, status="unsupported", note=UNSUPPORTED_LOFTQ)
    record["trainable_parameters"], record["total_parameters"] = run.trainable_parameters, run.total_parameters
    record["load_seconds"] = round(time.perf_counter() - t_start, 2)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    curve, eval_seconds = [], [0.0]
    if initial_eval:
        curve.append((0, evaluate(model, eval_set, cfg, pad_id, device)))
        log(f"{method}: step 0 eval loss {curve[0][1]:.4f}")

    last_step = total_steps_for(len(run.train_set), cfg)

    def on_step(rec: dict) -> None:
        step = rec["step"]
        if (every and step % every == 0) or step == last_step:
            t0 = time.perf_counter()
            curve.append((step, evaluate(model, eval_set, cfg, pad_id, device)))
            eval_seconds[0] += time.perf_counter() - t0
            log(f"{method}: step {step} train loss {rec['loss']:.4f} eval loss {curve[-1][1]:.4f}")

    result = run.train(on_step=on_step)
    train_seconds = result.seconds - eval_seconds[0]
    record.update(steps=len(result.losses), final_eval_loss=curve[-1][1], perplexity=math.exp(curve[-1][1]),
                  eval_curve=curve, train_losses=result.losses, tokens=result.tokens,
                  train_seconds=round(train_seconds, 2),
                  tokens_per_second=round(result.tokens / max(train_seconds, 1e-9), 1))
    record.update(held_out_exact_match(model, tok, cfg, device, test_data, test_rows))
    record.update(artifact_size(model, cfg, out, tok))
    record["peak_memory_bytes"], record["peak_memory_kind"] = peak_memory_bytes(device)
    record["wall_seconds"] = round(time.perf_counter() - t_start, 2)
    return record


def held_out_exact_match(model, tok, cfg, device, test_data: str | None, test_rows: int) -> dict:
    """{"exact_match": share of the first test_rows rows answered exactly (greedy, 40 new tokens),
    "test_rows"}; exact_match None when the rows are not JSON-answer chat rows (or none given)."""
    import torch

    from ..train.data import read_jsonl
    from ..train.loop import autocast
    from ..eval.tasks import exact_match, prompt_messages
    from .generate import generate_chat

    rows = read_jsonl(test_data)[:test_rows] if test_data else []
    if not is_json_task(rows):
        return {"exact_match": None, "test_rows": 0}
    with autocast(cfg, device):  # generate_chat's own autocast is for the CPU only
        replies = generate_chat(model, tok, [prompt_messages(r) for r in rows], max_new_tokens=40, batch_size=32,
                                compute_dtype=getattr(torch, cfg.compute_dtype))
    return {"exact_match": sum(exact_match(p, r) for p, r in zip(replies, rows)) / len(rows), "test_rows": len(rows)}


def artifact_size(model, cfg, out: Path, tokenizer=None) -> dict:
    """What a method leaves to ship: the PEFT adapter folder, or the whole model in BF16 (full; its
    folder is written too, with the tokenizer, so that `qforge bench --eval-tasks` can serve it densely)."""
    if cfg.method == "full":
        distinct = {id(p): p.numel() for p in model.parameters()}  # tied embeddings counted once
        folder = out / "model"
        model.save_pretrained(str(folder))
        if tokenizer is not None:
            from ..model.checkpoint import save_tokenizer
            save_tokenizer(tokenizer, folder, getattr(model, "generation_config", None))
        return {"artifact": "model (bf16)", "artifact_bytes": 2 * sum(distinct.values()), "model_dir": str(folder)}
    from ..adapters import save_adapter
    folder = save_adapter(model, out / "adapter", name="default", base_model_name_or_path=cfg.model)
    return {"artifact": "adapter", "artifact_bytes": directory_bytes(folder), "adapter_dir": str(folder)}


# ---- the parent: one child process per method ----------------------------------------------------
def default_recipe() -> dict:
    """BENCH_RECIPE with the demo task's train and val files."""
    paths = demo_task_paths()
    return dict(BENCH_RECIPE, data=str(paths["train"]), eval_data=str(paths["val"]))


def prepare_model(model: str, methods: list[str]) -> None:
    """Build the cached copies of the embedded model that the methods load (the float32 folder and
    one 4-bit folder per quant type), so no child's peak memory or wall time includes a one-off
    conversion. A no-op for other models and when the copies exist."""
    if str(model).lower() != "smollm2":
        return
    from ..model.load import smollm2_folder, smollm2_quantized_folder
    smollm2_folder()
    for quant_type in sorted({METHOD_SETTINGS[m].get("quant_type") for m in methods} - {None}):
        if quant_type.startswith("hqq"):  # HQQ bases are quantised from the float32 copy in each child
            continue
        smollm2_quantized_folder({"quant_type": quant_type, "blocksize": 64, "double_quant": True})


def bench_env(extra_env: dict | None = None) -> dict:
    """What a bench child adds to its environment (qforge.train.child adds the rest)."""
    # OMP_WAIT_POLICY=PASSIVE: on a CPU shared with other processes, OpenMP threads that spin while
    # waiting made a 6 s training step take 50-65 s here (2 cores, load 4); passive waiting costs
    # little on a quiet machine. An explicit setting in the environment wins.
    env = {key: os.environ.get(key, value) for key, value in (("HF_HUB_OFFLINE", "1"), ("OMP_WAIT_POLICY", "PASSIVE"))}
    return {**env, **(extra_env or {})}


def run_child(args: list[str], log_path: Path, timeout: float | None = None, extra_env: dict | None = None) -> int:
    """`python -m qforge.eval.bench ARGS` in a fresh process, its output to log_path (a new log)."""
    from ..train.child import start_child
    Path(log_path).unlink(missing_ok=True)
    proc = start_child("qforge.eval.bench", args, log_path, bench_env(extra_env))
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def run_method_in_child(method: str, recipe: dict, out: Path, test_data: str | None, test_rows: int,
                        full_lr_scale: float = FULL_LR_SCALE) -> dict:
    """run_method in a fresh process (qforge.train.child); a failed child gives a record with
    status 'failed' and the tail of its log."""
    from ..train.child import RESULT_NAME, train_in_child

    folder = out / method
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"method": method, "recipe": recipe, "output_dir": str(folder), "test_data": test_data,
            "test_rows": test_rows, "full_lr_scale": full_lr_scale}
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    (folder / "log.txt").unlink(missing_ok=True)
    t0 = time.perf_counter()
    code, result = train_in_child("qforge.eval.bench", ["child", str(folder / "spec.json")], folder / RESULT_NAME,
                                  folder / "log.txt", bench_env())
    if code == 0 and result is not None:
        return result
    tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
    return {"method": method, "status": "failed", "wall_seconds": round(time.perf_counter() - t0, 2),
            "note": f"exit status {code}: " + " | ".join(tail)}


def run_bench(recipe: dict, methods: list[str], output_dir: str | Path, test_data: str | None = None,
              test_rows: int = 100, full_lr_scale: float = FULL_LR_SCALE, log=print) -> list[dict]:
    """Every method in its own process, one after another; writes bench.json, bench.md and
    bench_eval_loss.png under output_dir and returns the records."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}: choose from {', '.join(BENCH_METHODS)}")
    for m in methods:  # a bad recipe fails here, before any child starts
        method_config(m, recipe, out / m, full_lr_scale)
    if run_child(["prepare", str(recipe.get("model", "smollm2")), ",".join(methods)], out / "prepare.log") != 0:
        raise RuntimeError(f"preparing the model failed; see {out / 'prepare.log'}")
    t0, records = time.perf_counter(), []
    for i, method in enumerate(methods, 1):
        log(f"[{i}/{len(methods)}] {method}: training {recipe.get('max_steps')} steps ...")
        record = run_method_in_child(method, recipe, out, test_data, test_rows, full_lr_scale)
        records.append(record)
        log(f"[{i}/{len(methods)}] {progress_line(record)}")
        write_outputs(records, recipe, out, time.perf_counter() - t0)
    return records


def progress_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['method']}: {r['status']}: {r.get('note', '')}"
    em = "" if r.get("exact_match") is None else f", exact match {r['exact_match']:.0%}"
    return (f"{r['method']}: eval loss {r['final_eval_loss']:.4f}{em}, peak {r['peak_memory_bytes'] / 1e9:.2f} GB, "
            f"{r['tokens_per_second']:.0f} tok/s, {r['wall_seconds']:.0f} s")


def format_table(records: list[dict]) -> str:
    """The markdown table of bench.md (GB = 1e9 bytes, MB = 1e6)."""
    head = ("| method | final eval loss | perplexity | exact match | peak memory (GB) | tokens/s | wall (s) "
            "| adapter on disk (MB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r.get('note', '')} |" + " |" * 6)
            continue
        em = "n/a" if r.get("exact_match") is None else f"{r['exact_match']:.0%} of {r['test_rows']}"
        size = f"{r['artifact_bytes'] / 1e6:.1f}" + (" (full model, bf16)" if r["artifact"] != "adapter" else "")
        lines.append(f"| {r['method']} | {r['final_eval_loss']:.4f} | {r['perplexity']:.3f} | {em} | "
                     f"{r['peak_memory_bytes'] / 1e9:.2f} | {r['tokens_per_second']:.0f} | {r['wall_seconds']:.0f} "
                     f"| {size} |")
    return "\n".join(lines)


def plot_eval_curves(records: list[dict], path: Path) -> None:
    """Eval loss against optimiser step, one line per method that ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in records:
        if r["status"] == "ok" and r.get("eval_curve"):
            ax.plot(*zip(*r["eval_curve"]), "o-", ms=3, lw=1.2, label=r["method"])
    ax.set_xlabel("optimiser step")
    ax.set_yscale("log")  # the step-0 losses are ~30x the final ones; the methods differ at the end
    ax.set_ylabel("eval loss (log scale)")
    ax.set_title("eval loss by method (same data, steps and seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(records: list[dict], recipe: dict, out: Path, seconds: float) -> None:
    from ..fileio import atomic_write_bytes
    summary = {"recipe": recipe, "total_seconds": round(seconds, 1), "methods": records}
    atomic_write_bytes(out / "bench.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "bench.md", (format_table(records) + "\n").encode())
    plot_eval_curves(records, out / "bench_eval_loss.png")


def _child_main(argv: list[str]) -> int:
    """`child SPEC.json` runs one method and writes result.json beside the spec;
    `prepare MODEL METHODS` builds the cached model copies."""
    if argv[:1] == ["prepare"]:
        prepare_model(argv[1], argv[2].split(","))
        return 0
    if argv[:1] != ["child"] or len(argv) != 2:
        print("usage: python -m qforge.eval.bench child SPEC.json | prepare MODEL METHODS", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    record = run_method(spec["method"], spec["recipe"], spec["output_dir"], spec.get("test_data"),
                        spec.get("test_rows", 100), spec.get("full_lr_scale", FULL_LR_SCALE))
    from ..train.child import RESULT_NAME, write_result
    write_result(Path(spec["output_dir"]) / RESULT_NAME, record)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
