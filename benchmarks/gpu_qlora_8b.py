"""QLoRA on a Llama-3.1-8B-shaped model: qforge against bitsandbytes + PEFT, two precision-matched pairs.

    python benchmarks/gpu_qlora_8b.py --write-model            # once, before any clock (~16 GB)
    python benchmarks/gpu_qlora_8b.py --no-write [--repeats 3] [--steps 3] [--seq 2048] [--deadline-s 280]

A randomly initialised model of Llama-3.1-8B's shape (speed and memory do not depend on the
values) is written once to DIR as sharded bf16 safetensors (~16 GB; drawn tensor by tensor on the
GPU, so the writer never holds the model). `--write-model` does only that, so the write is never
inside a timed window or a side's time limit; `--no-write` refuses to run without it.

Each side runs in its own fresh process, two arms one after the other on one loaded model:

  qforge  load_model(DIR, device=cuda) (NF4 + double quant, streamed), LoRA r=16 alpha=32 on every
          linear layer but lm_head, prepare_for_kbit_training with gradient checkpointing, SDPA;
          arm "qforge bf16 residual": the bf16 residual stream (`--residual-dtype bfloat16`);
          arm "qforge f32 residual": then surgery.use_float32_residual (qforge's default for qlora,
          `--residual-dtype auto`: the embeddings' output and the norms float32, residual sums in
          float32; the BF16 embedding matrix itself stays BF16, PEFT's recipe's values without its copy).
  peft    AutoModelForCausalLM.from_pretrained(DIR, BitsAndBytesConfig(nf4, double quant, bf16
          compute), attn_implementation="sdpa"), LoraConfig(r=16, lora_alpha=32, all-linear);
          arm "peft no upcast": gradient checkpointing (non-reentrant) + enable_input_require_grads
          only, everything that is not 4-bit stays bf16;
          arm "peft recipe": peft.unload(), then peft.prepare_model_for_kbit_training (which upcasts
          every non-4-bit weight, the 128256x4096 embedding and lm_head included, to float32) and a
          fresh get_peft_model.
  Pairs: qforge f32 residual (qforge's default) vs peft recipe; qforge bf16 residual vs peft no
  upcast. (qforge keeps its norms in float32 in both arms, as its recipe does: a few hundred KB on
  this shape.) The table prints each arm's embedding/head dtypes: BF16 for both qforge arms (the
  float32 residual casts the embeddings' output, not the matrix), float32 for PEFT's recipe.

Both sides: batch 1 x seq tokens, bf16 autocast, LoRA dropout --dropout (default 0.05, the QLoRA
recipe's and qforge's LoraSpec default; the same on both), adapters re-initialised (B = 0) at each
arm's start, 2 warm-up steps, then torch.cuda.reset_peak_memory_stats() (after load and warm-up,
so the peak is the training step's, not the loader's), then --steps timed steps. Memory:
max_memory_allocated and max_memory_reserved over the timed steps, and the device memory in use
(torch.cuda.mem_get_info: total - free, which also sees what is outside torch's allocator) at the
end of them. The optimiser is the non-paged 8-bit AdamW on both sides (bitsandbytes' AdamW8bit,
qforge's AdamW8bit(paged=False)): bitsandbytes' paged state lives in CUDA managed memory that
max_memory_allocated does not count, so a paged peer would look smaller than it is. Between the
two arms of a process the first arm's optimiser and gradients are freed and the allocator cache
emptied (torch.cuda.empty_cache) before the second arm's warm-up.

Repeats are interleaved: repeat 1 runs qforge then peft, repeat 2 peft then qforge, and so on.
Each process has its own time limit (--side-limit-s), and the whole run a deadline (--deadline-s):
a side starts only while the time left covers 1.25x its longest run so far (its whole limit before
its first run); otherwise it is skipped and reported, not half-run. A pair's ratio uses only the
repeats where both sides finished, and the table says how many those were. Output: library versions, one table row per
arm and repeat, a table of medians with (min-max) spread, and a last line
    gpu_qlora_speed_vs_peft_recipe=A gpu_qlora_mem_vs_peft_recipe=B
    gpu_qlora_bf16res_speed_vs_peft_noupcast=C gpu_qlora_bf16res_mem_vs_peft_noupcast=D
(median over repeats of qforge / PEFT tokens/s and of qforge / PEFT max_memory_allocated; A and B
from the float32 pair (qforge's default against PEFT's recipe), C and D from the bf16 pair; "nan" where a side never finished).
Without CUDA it says so and exits 0 (unless --smoke).

`--smoke` runs the same code on the CPU with a tiny model of the same family (checks the script,
not the speed; bitsandbytes' CPU kernels serve PEFT there; memory figures are 0 on the CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
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


def _model_ready(folder: str, config) -> bool:
    stamp = os.path.join(folder, "qforge-random.json")
    return os.path.isfile(stamp) and open(stamp).read() == json.dumps(config.to_dict(), sort_keys=True, default=str)


def write_random_model(folder: str, config, device: str) -> None:
    """config.json + sharded bf16 safetensors of N(0, 0.02) weights (norms 1), written once:
    a folder that already holds this config is kept. Tensors are drawn on `device` one at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    stamp = os.path.join(folder, "qforge-random.json")
    want = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if _model_ready(folder, config):
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


def _memory(device: str) -> dict:
    """Peak allocated / reserved since the last reset, and device memory in use now (bytes)."""
    import torch
    if device != "cuda":
        return {"alloc": 0, "reserved": 0, "in_use": 0}
    free, total = torch.cuda.mem_get_info()
    return {"alloc": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "in_use": total - free}


def _fresh_memory(device: str) -> None:
    """Drop what an earlier arm left in the allocator's cache, then start the peaks from now."""
    import gc

    import torch
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _timed(model, opt, ids, steps: int, device: str) -> dict:
    """2 warm-up steps, then the peaks reset, then `steps` timed steps: tokens/s and the memory of
    training (the loader's transient peak and the first optimiser-state allocation excluded)."""
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
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"tok_s": ids.numel() * steps / (time.perf_counter() - t0), **_memory(device),
            "first_loss": first, "last_loss": last}


def _dtypes(model) -> str:
    """The input embedding's and the LM head's dtypes (what each arm's recipe left them in)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    name = lambda m: str(m.weight.dtype).replace("torch.", "") if m is not None else "-"  # noqa: E731
    return f"{name(emb)}/{name(head)}"


def _ids(vocab: int, seq: int, device: str):
    import torch
    return torch.randint(0, vocab, (1, seq), device=device, generator=torch.Generator(device=device).manual_seed(0))


def run_qforge(folder: str, args, device: str) -> dict:
    """Arms "qforge bf16 residual" then "qforge f32 residual" on one loaded model."""
    import torch

    from qforge.devices import resolve_device
    from qforge.model.load import load_model
    from qforge.model.surgery import (add_adapter, prepare_for_kbit_training, use_float32_residual,
                                      use_qforge_attention)
    from qforge.nn import LoraSpec
    from qforge.optim import AdamW8bit

    t0 = time.perf_counter()
    model, _ = load_model(folder, device=resolve_device(device))
    torch.manual_seed(0)
    add_adapter(model, "default", LoraSpec(r=RANK, alpha=ALPHA, dropout=args.dropout))
    load_s = time.perf_counter() - t0
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    use_qforge_attention(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    init = [p.detach().to("cpu", copy=True) for p in trainable]  # the adapters' start, kept off the device
    ids = _ids(model.config.vocab_size, args.seq, device)
    out = {}
    for arm in ("qforge bf16 residual", "qforge f32 residual"):
        if arm == "qforge f32 residual":
            use_float32_residual(model)
        with torch.no_grad():
            for p, p0 in zip(trainable, init):
                p.copy_(p0)
        _fresh_memory(device)
        opt = AdamW8bit(trainable, lr=1e-4, paged=False)
        out[arm] = {**_timed(model, opt, ids, args.steps, device), "load_s": load_s, "dtypes": _dtypes(model)}
        del opt
        for p in trainable:
            p.grad = None
    return out


def _peft_arm(model, upcast: bool, args):
    """The PEFT model of one arm on a loaded 4-bit base: the recipe (prepare_model_for_kbit_training,
    which upcasts) or checkpointing alone (no upcast)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=args.dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def run_peft(folder: str, args, device: str) -> dict:
    """Arms "peft no upcast" then "peft recipe" on one loaded 4-bit base."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config, dtype=torch.bfloat16,
                                                device_map={"": device}, attn_implementation="sdpa")
    load_s = time.perf_counter() - t0
    ids = _ids(base.config.vocab_size, args.seq, device)
    out = {}
    for arm, upcast in (("peft no upcast", False), ("peft recipe", True)):
        model = _peft_arm(base, upcast, args)
        model.train()
        _fresh_memory(device)
        opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        out[arm] = {**_timed(model, opt, ids, args.steps, device), "load_s": load_s, "dtypes": _dtypes(model)}
        del opt
        base = model.unload()  # the 4-bit base without the adapters, for the next arm
        del model
    return out


def versions() -> str:
    """One line: the libraries (and the card) the figures depend on."""
    from importlib import metadata

    import torch
    got = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    for name in ("bitsandbytes", "peft", "transformers", "triton"):
        try:
            got.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            got.append(f"{name} missing")
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA (CPU smoke run)"
    return "versions: " + ", ".join(got) + f"; device: {card}"


def one_side(args) -> int:
    """Run one side's two arms in this process and print their figures as one JSON line."""
    device = "cpu" if args.smoke else "cuda"
    result = (run_qforge if args.side == "qforge" else run_peft)(args.model_dir, args, device)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


PAIRS = (("f32", "qforge f32 residual", "peft recipe"), ("bf16", "qforge bf16 residual", "peft no upcast"))


def _run_side(side: str, args, limit: float) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model-dir", args.model_dir,
           "--steps", str(args.steps), "--seq", str(args.seq), "--dropout", str(args.dropout)]
    cmd += ["--smoke"] if args.smoke else []
    print(f"## {side}: {' '.join(cmd[2:])} (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                              timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"{side} ran past its {limit:.0f} s limit and was stopped")
        return None
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(f"{side} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        return None
    print(f"{side} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(line[len("RESULT "):])


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "nan"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def side_by_side(args) -> int:
    import torch
    from common import markdown_table

    device = "cpu" if args.smoke else "cuda"
    config = model_config(args.layers, args.smoke)
    if args.no_write:
        if not _model_ready(args.model_dir, config):
            print(f"no random model in {args.model_dir}: run with --write-model first (not inside the clock)")
            return 1
    else:
        write_random_model(args.model_dir, config, device)
    torch.cuda.empty_cache() if device == "cuda" else None
    print(versions())
    print(f"budget: {args.repeats} repeats x 2 processes, each at most {args.side_limit_s:.0f} s, all within "
          f"{args.deadline_s:.0f} s", flush=True)
    start = time.perf_counter()
    runs: list[dict[str, dict]] = []  # per repeat: arm -> figures
    took: dict[str, float] = {}  # each side's longest run so far (s)
    for r in range(args.repeats):
        order = ("qforge", "peft") if r % 2 == 0 else ("peft", "qforge")
        got: dict[str, dict] = {}
        for side in order:
            # A side starts only when what is left covers its own need (1.25x its longest run so far,
            # or its whole limit before its first run), so the deadline skips a run, never cuts one short.
            left = args.deadline_s - (time.perf_counter() - start)
            need = 1.25 * took[side] if side in took else args.side_limit_s
            if left < min(need, args.side_limit_s):
                print(f"## {side}, repeat {r + 1}: skipped ({left:.0f} s left of the {args.deadline_s:.0f} s "
                      f"deadline, it needs {need:.0f} s)")
                continue
            t0 = time.perf_counter()
            got.update(_run_side(side, args, min(args.side_limit_s, left)) or {})
            took[side] = max(took.get(side, 0.0), time.perf_counter() - t0)
        runs.append(got)
    layers = config.num_hidden_layers
    print(f"\nLlama-3.1-8B shape ({layers} layers), random weights; batch 1 x {args.seq} tokens; QLoRA NF4 + DQ, "
          f"r={RANK} alpha={ALPHA} all-linear; LoRA dropout {args.dropout} on both sides; gradient checkpointing; "
          f"bf16 autocast; non-paged 8-bit AdamW on both sides; peaks reset after load and 2 warm-up steps; "
          f"{args.steps} timed steps; repeats interleaved (odd: qforge first, even: peft first)\n")
    gib = 2**30
    header = ["arm", "repeat", "embedding/head dtype", "tokens/s", "max allocated GiB", "max reserved GiB", "device in use GiB",
              "load s", "step-0 loss", "last loss"]
    rows = [[arm, r + 1, f["dtypes"], f"{f['tok_s']:,.0f}", f"{f['alloc'] / gib:.2f}", f"{f['reserved'] / gib:.2f}",
             f"{f['in_use'] / gib:.2f}", f"{f['load_s']:.0f}", f"{f['first_loss']:.3f}", f"{f['last_loss']:.3f}"]
            for r, got in enumerate(runs) for arm, f in got.items()]
    print(markdown_table(header, rows))
    figures, summary = {}, []
    for tag, ours, peer in PAIRS:
        both = [g for g in runs if ours in g and peer in g]
        speed = [g[ours]["tok_s"] / g[peer]["tok_s"] for g in both]
        mem = [g[ours]["alloc"] / g[peer]["alloc"] for g in both if g[peer]["alloc"]]
        res = [g[ours]["reserved"] / g[peer]["reserved"] for g in both if g[peer]["reserved"]]
        summary.append([f"{ours} vs {peer}", len(both), _spread(speed, ".2f"), _spread(mem, ".2f"),
                        _spread(res, ".2f")])
        figures[tag] = (statistics.median(speed) if speed else float("nan"),
                        statistics.median(mem) if mem else float("nan"))
    print("\n" + markdown_table(["pair", "repeats with both", "speed qforge/peft median (min-max)",
                                  "max allocated qforge/peft", "max reserved qforge/peft"], summary))
    (a, b), (c, d) = figures["f32"], figures["bf16"]  # qforge's default (float32 residual) first
    print(f"\ngpu_qlora_speed_vs_peft_recipe={a:.2f} gpu_qlora_mem_vs_peft_recipe={b:.2f} "
          f"gpu_qlora_bf16res_speed_vs_peft_noupcast={c:.2f} gpu_qlora_bf16res_mem_vs_peft_noupcast={d:.2f}")
    return 0 if all(math.isfinite(x) for x in (a, c)) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=os.environ.get("QFORGE_BENCH_8B_DIR", "/tmp/qforge-llama31-8b-random"),
                    help="where the random model is written once (default: $QFORGE_BENCH_8B_DIR or "
                         "/tmp/qforge-llama31-8b-random)")
    ap.add_argument("--write-model", action="store_true",
                    help="only write the random model (if not already there) and exit: do it before timing")
    ap.add_argument("--no-write", action="store_true",
                    help="never write the model here: exit 1 if --write-model has not written it")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm, after 2 warm-up steps (default: 3)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per row, batch 1 (default: 2048)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, as Llama-3.1-8B)")
    ap.add_argument("--dropout", type=float, default=0.05,
                    help="LoRA dropout on both sides (default: 0.05, the QLoRA recipe's and qforge's default)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved repeats of the two processes (odd: qforge first; default: 3)")
    ap.add_argument("--side-limit-s", type=float, default=70.0,
                    help="time limit of each side's process, load included (default: 70)")
    ap.add_argument("--deadline-s", type=float, default=280.0,
                    help="no side process starts or runs past this many seconds from the first (default: 280)")
    ap.add_argument("--side", choices=("qforge", "peft"), default=None,
                    help="run one side's two arms in this process (what the side-by-side run calls; default: both)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, not the speed")
    args = ap.parse_args()
    if args.smoke:
        args.seq, args.steps = min(args.seq, 64), 1
        args.side_limit_s, args.deadline_s = max(args.side_limit_s, 300.0), max(args.deadline_s, 1200.0)
    else:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 0
    if args.write_model:
        write_random_model(args.model_dir, model_config(args.layers, args.smoke), "cpu" if args.smoke else "cuda")
        return 0
    return one_side(args) if args.side else side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
