"""An 8B model on this machine: quantise a Llama-3.1-8B-shaped checkpoint and train one QLoRA step.

    python benchmarks/big_model.py [--cache DIR] [--keep]

1. A randomly initialised model of Llama-3.1-8B's shape (hidden 4096, intermediate 14336, 32 layers,
   32 heads / 8 KV heads, vocab 128256, untied head; 8.03 B parameters, 16.06 GB in bf16) is written
   once as 4 bf16 safetensors shards under DIR (default $QFORGE_CACHE/bench), generated a slice at a
   time (never the whole model, never a whole tensor in float32), with SmolLM2's tokenizer (its ids
   all lie inside the 128k vocabulary).
2. `qforge quantize` (NF4, double quantisation, bf16) writes its 4-bit folder, in a subprocess.
3. `qforge train` runs one QLoRA step from the 4-bit folder (r=16, alpha 32, all-linear, batch 1 x 256
   tokens, gradient checkpointing keeping the base products (what `qforge train` chooses here when
   the plan fits), paged 8-bit AdamW), in a subprocess.

Each phase runs in a fresh process started through this script (`--phase`), which notes its RSS
after importing torch, transformers and qforge (the import baseline), runs the qforge command in the
same process and reports its peak RSS (VmHWM) and wall time. Printed: both phases' peaks against the
checkpoint's bf16 size, their times, and the planner's prediction for the training run
(qforge.plan.plan_run with the CPU constants). Last line:

    quantize_peak_vs_bf16=A train_peak_gib=B step_seconds=C

A: the quantise phase's peak RSS above its import baseline over the checkpoint's bytes; B: the
training process' peak RSS in GiB (import baseline included); C: the wall time of the one optimiser
step (metrics.jsonl's elapsed_s; a time, so only meaningful on an idle machine). The 4-bit folder
is removed at the end unless --keep; the bf16 checkpoint stays for the next run (delete DIR to free
its 16 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import status_bytes  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
             rms_norm_eps=1e-5, rope_theta=500000.0, head_dim=128, dtype="bfloat16",
             rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
             bos_token_id=1, eos_token_id=2)
SHARDS = 4
NAME = "llama-3.1-8b-random-bf16"
SEQ, RANK = 256, 16
SLICE = 1 << 24  # values generated at a time (64 MB in float32)


# ---- the checkpoint, written a slice at a time ---------------------------------------------------
def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], gen) -> None:
    """A bf16 safetensors file: the header (offsets follow from the shapes), then each tensor
    generated SLICE values at a time (N(0, 0.02); norms 1) and appended."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in entries:
        n = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key, shape in entries:
            numel = torch.Size(shape).numel()
            for start in range(0, numel, SLICE):
                n = min(SLICE, numel - start)
                if key.endswith("norm.weight"):
                    t = torch.ones(n, dtype=torch.bfloat16)
                else:
                    t = torch.randn(n, generator=gen).mul_(0.02).to(torch.bfloat16)
                f.write(memoryview(t.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(folder: Path) -> None:
    """config.json, SHARDS bf16 shards of about equal size, their index and a tokenizer, atomically."""
    import torch
    from transformers import LlamaConfig

    from load_memory import tensor_shapes
    from qforge.model.checkpoint import write_new_folder
    from qforge.model.load import smollm2_folder

    entries = tensor_shapes(SHAPE)
    sizes = [2 * torch.Size(s).numel() for _, s in entries]
    total, groups, acc = sum(sizes), [[] for _ in range(SHARDS)], 0
    for entry, size in zip(entries, sizes):
        groups[min(SHARDS - 1, acc * SHARDS // total)].append(entry)
        acc += size
    gen = torch.Generator().manual_seed(0)

    def write(tmp: Path) -> None:
        weight_map = {}
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
            t0 = time.perf_counter()
            _write_shard(tmp / name, group, gen)
            weight_map.update({key: name for key, _ in group})
            print(f"  wrote {name} ({len(group)} tensors, {time.perf_counter() - t0:.0f} s)", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        LlamaConfig(**SHAPE).to_json_file(str(tmp / "config.json"))
        source = smollm2_folder()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, tmp / name)

    write_new_folder(folder, write)


# ---- the measured phases (each in its own process) ------------------------------------------------
def phase(name: str, argv: list[str], report: str) -> None:
    """Run `qforge <argv>` in this process; write {baseline, peak, seconds} to `report`."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import qforge.model.load  # noqa: F401
    import qforge.optim  # noqa: F401
    import qforge.train.loop  # noqa: F401
    from qforge.cli import main as qforge_main
    from qforge.model.load import release_free_memory

    release_free_memory()
    baseline = status_bytes("VmRSS")
    t0 = time.perf_counter()
    code = qforge_main(argv)
    seconds = time.perf_counter() - t0
    if code:
        sys.exit(f"qforge {' '.join(argv)} exited with {code}")
    Path(report).write_text(json.dumps({"phase": name, "baseline": baseline, "peak": status_bytes("VmHWM"),
                                        "seconds": seconds}))


def run_phase(name: str, argv: list[str], work: Path) -> dict:
    report = work / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    cmd = [sys.executable, __file__, "--phase", name, str(report), "--", *argv]
    print(f"$ qforge {' '.join(argv)}", flush=True)
    if subprocess.run(cmd, env=env).returncode or not report.is_file():
        sys.exit(f"phase {name} failed")
    return json.loads(report.read_text())


def training_data(path: Path) -> None:
    """Text rows of well over SEQ tokens (cut to SEQ by --max-seq-len)."""
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jovial bear".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(600))
    path.write_text(json.dumps({"text": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="where the bf16 checkpoint is kept (default: $QFORGE_CACHE/bench)")
    parser.add_argument("--keep", action="store_true", help="keep the 4-bit folder and the training run")
    parser.add_argument("--write-only", action="store_true", help="write the bf16 checkpoint and stop")
    parser.add_argument("--phase", nargs=2, metavar=("NAME", "REPORT"), help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args.phase[0], args.rest[1:] if args.rest[:1] == ["--"] else args.rest, args.phase[1])
    from qforge.paths import cache_dir
    from qforge.plan import CPU_BF16, plan_run

    base = Path(args.cache) if args.cache else cache_dir("bench")
    folder = base / NAME
    if not (folder / "config.json").is_file():
        print(f"writing the random checkpoint to {folder} (once, ~16 GB)", flush=True)
        t0 = time.perf_counter()
        write_checkpoint(folder)
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.write_only:
        return
    bf16 = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    work = base / "big_model_run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    four_bit, run_dir, data = work / "nf4", work / "train", work / "data.jsonl"
    training_data(data)
    try:
        quant = run_phase("quantize", ["quantize", str(folder), str(four_bit)], work)
        four_bit_bytes = sum(p.stat().st_size for p in four_bit.glob("*.safetensors"))
        train = run_phase("train", ["train", "--model", str(four_bit), "--data", str(data), "--data-format", "text",
                                    "--train-on", "all", "--max-steps", "1", "--batch-size", "1",
                                    "--max-seq-len", str(SEQ), "--rank", str(RANK), "--alpha", str(2 * RANK),
                                    "--target-modules", "all-linear", "--keep-base-outputs", "--output-dir", str(run_dir),
                                    "--device", "cpu"], work)
        record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    plan = plan_run(dict(SHAPE), "qlora", seq_len=SEQ, batch_size=1, rank=RANK, gradient_checkpointing=True,
                    keep_base_outputs=True, constants=CPU_BF16, chunked_loss=True)
    gib = 2**30
    print(f"\ncheckpoint: {folder}: {bf16 / 1e9:.2f} GB bf16 ({bf16 / gib:.2f} GiB); "
          f"4-bit folder {four_bit_bytes / 1e9:.2f} GB")
    print("| phase | import baseline | peak RSS | peak - baseline | (peak - baseline) / bf16 | wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in (quant, train):
        print(f"| {r['phase']} | {r['baseline'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB "
              f"| {(r['peak'] - r['baseline']) / gib:.2f} GiB | {(r['peak'] - r['baseline']) / bf16:.3f} "
              f"| {r['seconds']:.0f} s |")
    print(f"planner (qforge.plan, CPU constants), QLoRA r={RANK}, 1 x {SEQ}: {plan.total / gib:.2f} GiB above the "
          f"import baseline (measured {(train['peak'] - train['baseline']) / gib:.2f} GiB)")
    print(f"one optimiser step: {record['elapsed_s']:.1f} s (loss {record['loss']:.3f})")
    print(f"quantize_peak_vs_bf16={(quant['peak'] - quant['baseline']) / bf16:.3f} "
          f"train_peak_gib={train['peak'] / gib:.2f} step_seconds={record['elapsed_s']:.1f}")


if __name__ == "__main__":
    main()
