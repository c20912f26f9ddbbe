"""QLoRA on a Llama-3.1-8B-shaped model: qforge against bitsandbytes + PEFT, side by side.

    python benchmarks/gpu_qlora_8b.py [--model-dir DIR] [--steps 4] [--seq 2048] [--layers 32]

A randomly initialised model of Llama-3.1-8B's shape (speed and memory do not depend on the
values) is written once to DIR as sharded bf16 safetensors (~16 GB; generated tensor by tensor on
the GPU, so the writer never holds the model). Each side then runs in its own process, so
`torch.cuda.max_memory_allocated` is its own:

  qforge   load_model(DIR, device=cuda): streamed, quantised on the GPU (NF4 + double quant),
           LoRA r=16 alpha=32 on every linear layer but lm_head; prepare_for_kbit_training with
           gradient checkpointing; qforge's attention (SDPA); qforge's paged 8-bit AdamW.
  peft     the documented QLoRA recipe: AutoModelForCausalLM.from_pretrained(DIR,
           quantization_config=BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute)),
           peft.prepare_model_for_kbit_training(gradient checkpointing), LoraConfig(r=16,
           lora_alpha=32, target_modules="all-linear"), bitsandbytes' PagedAdamW8bit.

Both: batch 1 x seq tokens, bf16 autocast, lora dropout 0 (qforge's fused LoRA layer has none;
the same for PEFT keeps the comparison fair), 2 warm-up steps, then `--steps` timed steps.
Output: a markdown table and a last line
    gpu_qlora_speed_vs_peft=A gpu_qlora_mem_vs_peft=B
A = qforge tokens/s / PEFT tokens/s, B = qforge peak bytes / PEFT peak bytes ("nan" for a side
that failed: its error is printed above). Without CUDA it says so and exits 0 (unless --smoke).

`--smoke` runs both sides on the CPU with a tiny model of the same family (checks the script,
not the speed; bitsandbytes' CPU kernels serve PEFT there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)

# Llama-3.1-8B's config.json (the parts that shape the compute).
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
                   eos_token_id=128001, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192,
                                                      "rope_type": "llama3"})
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   bos_token_id=1, eos_token_id=2)
SHARD_BYTES = 4 * 2**30
RANK, ALPHA = 16, 32


def model_config(layers: int | None, smoke: bool):
    from transformers import LlamaConfig
    shape = dict(LLAMA_31_8B)
    if smoke:
        shape.update(SMOKE_SHAPE)
        shape.pop("rope_scaling")
    if layers:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(**shape, torch_dtype="bfloat16")


def write_random_model(folder: str, config, device: str) -> None:
    """config.json + sharded bf16 safetensors of N(0, 0.02) weights (norms 1), written once:
    a folder that already holds this config is kept. Tensors are drawn on `device` one at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    stamp = os.path.join(folder, "qforge-random.json")
    want = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if os.path.isfile(stamp) and open(stamp).read() == want:
        print(f"random model already in {folder}")
        return
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    shards, shard, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    t0 = time.perf_counter()
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen).cpu()
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[key], size = t, size + t.numel() * 2
    flush()
    # Renumber to the -of-N names transformers writes.
    final = {}
    for i, name in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(folder, name), os.path.join(folder, new))
        final[name] = new
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())},
             "weight_map": {k: final[v] for k, v in weight_map.items()}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
    config.save_pretrained(folder)
    with open(stamp, "w") as f:
        f.write(want)
    print(f"wrote {len(shards)} shards to {folder} in {time.perf_counter() - t0:.0f} s")


def _peak(device: str) -> int:
    import torch
    return torch.cuda.max_memory_allocated() if device == "cuda" else 0


def _timed(model, opt, ids, steps: int, device: str) -> dict:
    """Tokens/s and peak bytes over `steps` steps after 2 warm-up steps (the peak counts from the start:
    loading and the warm-up steps' first optimiser state are part of what a run needs)."""
    import torch

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = step()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"tok_s": ids.numel() * steps / (time.perf_counter() - t0), "peak": _peak(device),
            "first_loss": first, "last_loss": last}


def run_qforge(folder: str, args, device: str) -> dict:
    import torch

    from qforge.devices import resolve_device
    from qforge.model.load import load_model
    from qforge.model.surgery import add_adapter, prepare_for_kbit_training, use_qforge_attention
    from qforge.nn import LoraSpec
    from qforge.optim import AdamW8bit

    t0 = time.perf_counter()
    model, _ = load_model(folder, device=resolve_device(device))
    add_adapter(model, "default", LoraSpec(r=RANK, alpha=ALPHA, dropout=0.0))
    load_s = time.perf_counter() - t0
    load_peak = _peak(device)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    use_qforge_attention(model)
    model.train()
    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4, paged=True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    return {**_timed(model, opt, ids, args.steps, device), "load_s": load_s, "load_peak": load_peak}


def run_peft(folder: str, args, device: str) -> dict:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config, dtype=torch.bfloat16,
                                                 device_map={"": device}, attn_implementation="sdpa")
    load_s = time.perf_counter() - t0
    load_peak = _peak(device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    return {**_timed(model, opt, ids, args.steps, device), "load_s": load_s, "load_peak": load_peak}


def one_side(args) -> int:
    """Run one side in this process and print its figures as one JSON line."""
    device = "cpu" if args.smoke else "cuda"
    result = (run_qforge if args.side == "qforge" else run_peft)(args.model_dir, args, device)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def side_by_side(args) -> int:
    import torch
    from common import markdown_table

    device = "cpu" if args.smoke else "cuda"
    config = model_config(args.layers, args.smoke)
    write_random_model(args.model_dir, config, device)
    torch.cuda.empty_cache() if device == "cuda" else None
    results = {}
    for side in ("qforge", "peft"):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model-dir", args.model_dir,
               "--steps", str(args.steps), "--seq", str(args.seq)] + (["--smoke"] if args.smoke else [])
        print(f"\n## {side}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{side} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
            continue
        results[side] = json.loads(line[len("RESULT "):])
    rows = [[side, f"{r['tok_s']:,.0f}", f"{r['peak'] / 2**30:.2f}", f"{r['load_peak'] / 2**30:.2f}",
             f"{r['load_s']:.0f}", f"{r['first_loss']:.3f}", f"{r['last_loss']:.3f}"] for side, r in results.items()]
    layers = config.num_hidden_layers
    print(f"\nLlama-3.1-8B shape ({layers} layers), random weights; batch 1 x {args.seq} tokens; QLoRA NF4 + DQ, "
          f"r={RANK} all-linear; gradient checkpointing; bf16 autocast; paged 8-bit AdamW; {args.steps} timed steps\n")
    print(markdown_table(["side", "tokens/s", "peak GiB (max_memory_allocated)", "peak GiB after load",
                          "load s", "step-0 loss", "last loss"], rows))
    q, p = results.get("qforge"), results.get("peft")
    speed = q["tok_s"] / p["tok_s"] if q and p else float("nan")
    mem = q["peak"] / p["peak"] if q and p and p["peak"] else float("nan")
    print(f"\ngpu_qlora_speed_vs_peft={speed:.2f} gpu_qlora_mem_vs_peft={mem:.2f}")
    return 0 if q and p else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.environ.get("QFORGE_BENCH_8B_DIR", "/tmp/qforge-llama31-8b-random"),
                    help="where the random model is written once (default: $QFORGE_BENCH_8B_DIR or "
                         "/tmp/qforge-llama31-8b-random)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side, after 2 warm-up steps (default: 4)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row, batch 1 (default: 2048)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, as Llama-3.1-8B)")
    ap.add_argument("--side", choices=("qforge", "peft"), default=None,
                    help="run one side in this process (what the side-by-side run calls; default: both)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, not the speed")
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.steps = min(args.seq, 64), 1
    else:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 0
    return one_side(args) if args.side else side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
