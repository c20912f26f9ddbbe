"""Multi-LoRA serving throughput: mixed-adapter batching against one-at-a-time and single-adapter.

Loads the embedded SmolLM2-135M-Instruct (4-bit NF4 base), writes 8 random adapters (non-zero B)
with save_adapter into a temporary adapter root, and serves them over HTTP on loopback. Then drives
32 concurrent chat requests (fixed prompts, greedy, a fixed number of new tokens) three ways:

  multi   requests spread over the 8 adapters, continuous batching (--max-batch 32)
  naive   the same requests served one at a time (--max-batch 1), switching adapters between them
  single  every request on one adapter, continuous batching

Each request generates exactly --max-tokens tokens (ignore_eos). The batched modes run --repeat
times, interleaved, and each mode's best run counts (the CPUs are shared and noisy); naive runs once.
Prints a table and, last, `multi_vs_naive=X multi_vs_single=Y p50_latency_s=L`: X and Y are ratios of
generated tokens per second, L the median request latency of the best multi run.

  python benchmarks/serve_throughput.py [--requests 32] [--max-tokens 32] [--repeat 3] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qforge.adapters import save_adapter  # noqa: E402
from qforge.model.load import load_model  # noqa: E402
from qforge.model.surgery import add_adapter, adapted_layers, set_active_adapter  # noqa: E402
from qforge.nn import LoraSpec  # noqa: E402
from qforge.serve import AdapterRegistry, Engine, detach_adapter  # noqa: E402
from qforge.serve.api import create_app  # noqa: E402

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Explain photosynthesis briefly.",
           "Give me three names for a cat.", "How do I boil an egg?", "Translate 'good morning' to Spanish.",
           "What is 12 times 7?", "Describe a sunset in one sentence."]


def make_adapters(model, root: Path, count: int, rank: int, seed: int = 0) -> list[str]:
    """`count` random PEFT adapters (all linear layers, rank `rank`, B non-zero) saved under root."""
    names = []
    for i in range(count):
        name = f"adapter{i}"
        add_adapter(model, name, LoraSpec(r=rank, alpha=2 * rank, dropout=0.0, dtype=torch.bfloat16))
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for _, layer in adapted_layers(model):
                b = layer.adapters[name].lora_B.weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
        save_adapter(model, root / name, name=name, base_model_name_or_path="smollm2")
        detach_adapter(model, name)
        names.append(name)
    set_active_adapter(model, None)
    return names


def serve(model, tokenizer, registry, max_batch: int):
    """(uvicorn server, its thread, base url) for a fresh engine over the shared model and registry."""
    import socket

    import uvicorn

    engine = Engine(model, tokenizer, registry, max_batch=max_batch, max_queue=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, registry), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, engine, f"http://127.0.0.1:{port}/v1"


def drive(url: str, models: list[str], max_tokens: int) -> tuple[float, list[float], int]:
    """Send len(models) chat requests at once; (wall seconds, latencies, generated tokens)."""
    latencies, tokens, errors = [0.0] * len(models), [0] * len(models), []

    def one(i: int) -> None:
        body = {"model": models[i], "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        start = time.perf_counter()
        r = httpx.post(url + "/chat/completions", json=body, timeout=3600)
        latencies[i] = time.perf_counter() - start
        if r.status_code != 200:
            errors.append(r.text)
            return
        tokens[i] = r.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(models))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return wall, latencies, sum(tokens)


def run_mode(model, tokenizer, registry, name: str, models: list[str], max_batch: int, max_tokens: int) -> dict:
    server, thread, engine, url = serve(model, tokenizer, registry, max_batch)
    try:
        drive(url, models[:2], 2)  # warm-up: first forwards, adapter loads
        wall, latencies, tokens = drive(url, models, max_tokens)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()
    lat = sorted(latencies)
    return {"mode": name, "requests": len(models), "max_batch": max_batch, "adapters": len(set(models)),
            "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "p50_s": statistics.median(lat),
            "p90_s": lat[int(0.9 * (len(lat) - 1))]}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'mode':<8}{'run':>4}{'requests':>9}{'adapters':>9}{'max_batch':>10}{'tokens':>8}{'wall_s':>9}"
          f"{'tok/s':>9}{'p50_s':>8}{'p90_s':>8}")
    for r in rows:
        print(f"{r['mode']:<8}{r['run']:>4}{r['requests']:>9}{r['adapters']:>9}{r['max_batch']:>10}{r['tokens']:>8}"
              f"{r['wall_s']:>9.2f}{r['tok_per_s']:>9.2f}{r['p50_s']:>8.2f}{r['p90_s']:>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--modes", default="multi,naive,single")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the batched modes, interleaved; each mode's best counts (shared CPUs are noisy)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2", compute_dtype=getattr(torch, args.dtype))
    print(f"loaded smollm2 ({args.dtype}) in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(model, root, args.adapters, args.rank)
        registry = AdapterRegistry(model, "smollm2", max_loaded=max(16, args.adapters), adapter_root=root)
        for name in names:
            registry.add(name, name)
        mixed = [names[i % len(names)] for i in range(args.requests)]
        plans = {"multi": (mixed, 32), "naive": (mixed, 1), "single": ([names[0]] * args.requests, 32)}
        rows = []
        for run in range(args.repeat):
            for mode in modes:
                if mode == "naive" and run > 0:
                    continue  # minutes per run, and one request at a time is noisy much less
                rows.append(run_mode(model, tokenizer, registry, mode, *plans[mode], args.max_tokens) | {"run": run})
    print_table(rows)
    best = {m: max((r for r in rows if r["mode"] == m), key=lambda r: r["tok_per_s"]) for m in modes}
    if {"multi", "naive", "single"} <= set(best):
        print(f"best of {args.repeat} batched runs: multi {best['multi']['tok_per_s']:.1f} tok/s, "
              f"single {best['single']['tok_per_s']:.1f} tok/s, naive {best['naive']['tok_per_s']:.1f} tok/s")
        print(f"multi_vs_naive={best['multi']['tok_per_s'] / best['naive']['tok_per_s']:.2f} "
              f"multi_vs_single={best['multi']['tok_per_s'] / best['single']['tok_per_s']:.2f} "
              f"p50_latency_s={best['multi']['p50_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
