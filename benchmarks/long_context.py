"""Long rows on the CPU: peak training memory at 1k, 2k, 4k, 8k and 16k tokens per row, and the plan.

    python benchmarks/long_context.py [--lengths 1024,2048,4096,8192,16384] [--steps 2]

The model: a randomly initialised Llama-shaped model (hidden 128, intermediate 384, 2 layers, 4
heads of 32 / 2 KV heads, SmolLM2's 49,152-token vocabulary and tokenizer, untied head; 13 M
parameters, 6.3 M of them the head: small enough that 16k-token rows train in minutes on 2 cores), written once under $QFORGE_CACHE/bench. Each length trains in a fresh
process as `qforge train` would: QLoRA (NF4 + double quantisation, LoRA r=16 on every linear,
dropout 0.05), gradient checkpointing, bf16 autocast, qforge's attention (SDPA at these lengths),
the trainer's loss (qforge.train.loss: the chunked cross-entropy at these lengths), paged 8-bit
AdamW, batch 1, every token a target; `--steps` optimiser steps.

Measured: the process' RSS after importing torch, transformers and qforge (the baseline); the
model is loaded; the kernel's peak-RSS mark is reset (/proc/self/clear_refs, 5) so that loading
does not count; after the steps, peak = VmHWM - baseline: what the training phase holds at its
peak (the model included). glibc's mmap threshold is fixed at 128 KiB (MEASURE_ENV, as in
benchmarks/plan_calibration.py) so freed blocks leave the process and the peak is what is live.
Beside it: the planner's total (qforge.plan.plan_run, CPU constants) for the same run.

Last line: `mem_growth_16k_vs_1k=X`, the 16k peak over the 1k peak (16 would be exactly linear
in the row length with nothing fixed; quadratic attention or full logits would push it far above).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import status_bytes  # noqa: E402

SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=32768, tie_word_embeddings=False,
             rms_norm_eps=1e-5, rope_theta=10000.0)
NAME = "llama-13m-long-context-random"
RANK = 16
LENGTHS = (1024, 2048, 4096, 8192, 16384)


def write_model(folder: Path) -> None:
    """The random model (bf16 safetensors) with SmolLM2's tokenizer, atomically."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qforge.model.checkpoint import write_new_folder
    from qforge.model.load import smollm2_folder

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_folder() / name, tmp / name)

    write_new_folder(folder, write)


def measure(folder: str, seq_len: int, steps: int) -> dict:
    """One length, in this (fresh) process: see the module docstring."""
    import torch
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import qforge.adapters  # noqa: F401
    import qforge.model.load  # noqa: F401
    import qforge.optim  # noqa: F401
    from qforge.kernels import dispatch
    from qforge.model.load import release_free_memory
    from qforge.train.config import TrainConfig
    from qforge.train.loop import autocast, make_optimizer
    from qforge.train.loss import causal_lm_loss
    from qforge.train.run import load_for_method

    dispatch.warm_up(torch.device("cpu"))
    release_free_memory()
    baseline = status_bytes("VmRSS")
    cfg = TrainConfig(model=folder, method="qlora", rank=RANK, alpha=2 * RANK, batch_size=1, max_seq_len=seq_len,
                      gradient_checkpointing=True, keep_base_outputs=False, device="cpu", output_dir="/dev/null")
    model, _ = load_for_method(cfg, torch.device("cpu"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    release_free_memory()
    loaded = status_bytes("VmRSS") - baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the loading peak does not count
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        with autocast(cfg, torch.device("cpu")):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"seq_len": seq_len, "steps": steps, "baseline_bytes": baseline, "loaded_bytes": loaded,
            "peak_bytes": status_bytes("VmHWM") - baseline, "seconds": time.perf_counter() - t0, "losses": losses}


def planned(seq_len: int) -> int:
    from qforge.plan import CPU_BF16, plan_run
    return plan_run(dict(SHAPE), "qlora", seq_len=seq_len, batch_size=1, rank=RANK, gradient_checkpointing=True,
                    constants=CPU_BF16, chunked_loss=True).total


def run_length(folder: Path, seq_len: int, steps: int, work: Path) -> dict:
    from plan_calibration import MEASURE_ENV

    out = work / f"long-{seq_len}.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **MEASURE_ENV)
    proc = subprocess.run([sys.executable, __file__, "--child", str(folder), str(seq_len), str(steps), str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode or not out.is_file():
        sys.exit(f"length {seq_len} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="tokens per row, comma-separated")
    parser.add_argument("--steps", type=int, default=1, help="optimiser steps per length (default 1)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, seq_len, steps, out = args.child
        Path(out).write_text(json.dumps(measure(folder, int(seq_len), int(steps))))
        return
    from qforge.paths import cache_dir

    folder = cache_dir("bench") / NAME
    if not (folder / "config.json").is_file():
        write_model(folder)
    work = cache_dir("bench") / "long_context_run"
    work.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    print("| tokens per row | peak training memory | planner | planner error | loaded model | time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq_len in lengths:
        r = run_length(folder, seq_len, args.steps, work)
        plan = planned(seq_len)
        rows.append((r, plan))
        print(f"| {seq_len} | {r['peak_bytes'] / 1e6:,.0f} MB | {plan / 1e6:,.0f} MB | {plan / r['peak_bytes'] - 1:+.1%} "
              f"| {r['loaded_bytes'] / 1e6:,.0f} MB | {r['seconds']:.0f} s |", flush=True)
    worst = max(abs(plan / r["peak_bytes"] - 1) for r, plan in rows)
    print(f"\nworst planner error {worst:.1%}; losses {[round(r['losses'][0], 3) for r, _ in rows]}")
    by_len = {r["seq_len"]: r["peak_bytes"] for r, _ in rows}
    if 1024 in by_len and 16384 in by_len:
        print(f"mem_growth_16k_vs_1k={by_len[16384] / by_len[1024]:.2f}")


if __name__ == "__main__":
    main()
