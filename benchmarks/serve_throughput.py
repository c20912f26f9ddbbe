"""Multi-LoRA serving throughput: mixed-adapter batching against one-at-a-time, single-adapter and
PEFT's own mixed-adapter batch; and serving latency while a fine-tuning job trains beside the server.

Loads the embedded SmolLM2-135M-Instruct (4-bit NF4 base), writes 8 random adapters (non-zero B)
with save_adapter into a temporary adapter root, and serves them over HTTP on loopback. Then drives
32 concurrent chat requests (fixed prompts, greedy, a fixed number of new tokens) these ways:

  multi   requests spread over the 8 adapters, continuous batching (--max-batch 32)
  naive   the same requests served one at a time (--max-batch 1), switching adapters between them
  single  every request on one adapter, continuous batching
  peft    the peer: transformers + bitsandbytes NF4 (double quant, bf16 compute) with the same 8 adapter
          files loaded by PEFT, all 32 prompts (chat template applied, left padding) in ONE
          `generate(..., adapter_names=[...])` call, PEFT's mixed-adapter batch. No HTTP server: the
          peer's best case against qforge's served one.

Each request generates exactly --max-tokens tokens (ignore_eos / min_new_tokens). Every mode runs
--repeat times (at least 3), interleaved; the best run of each mode, and the median with its spread
(min-max) and the per-round multi/single ratios, are printed (the CPUs are shared and noisy).
--adapters 64: 64 adapters registered (rank --rank), the 32 requests on 32 distinct ones.

  training  `qforge serve --jobs` as a subprocess (default --worker-threads: half the cores; the
          server keeps the rest); --latency-requests short chat requests (8 new tokens, one at a time)
          are timed idle, then again while a QLoRA job trains in its worker (after the job's first
          step), --repeat rounds each; the best round's p50 and p95 count.

Prints a table and, last, `multi_vs_naive=X multi_vs_single=Y multi_vs_peft=Z p50_latency_s=L
serve_p50_with_training_vs_idle=T median_multi_vs_single=M`: X, Y and Z are ratios of generated tokens per second, L the
median request latency of the best multi run, T the training-time p50 over the idle p50 (target <= 1.5).

  python benchmarks/serve_throughput.py [--requests 32] [--max-tokens 32] [--repeat 3] [--dtype bfloat16]
      [--modes multi,naive,single,peft,training]
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


def load_peft_peer(folder: Path, root: Path, names: list[str], dtype: torch.dtype):
    """The embedded model through transformers + bitsandbytes NF4, the adapters through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qcfg, device_map="cpu", dtype=dtype)
    model = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def run_peft(peer, models: list[str], max_tokens: int) -> dict:
    """All requests in one PEFT mixed-adapter generate call (greedy, exactly max_tokens new tokens each)."""
    model, tok = peer
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(len(models))]
    inputs = tok(texts, return_tensors="pt", padding=True)
    kwargs = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        model.generate(**{k: v[:2] for k, v in inputs.items()}, adapter_names=models[:2], max_new_tokens=2,
                       min_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(**inputs, adapter_names=models, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             **kwargs)
        wall = time.perf_counter() - start
    tokens = int((out[:, inputs["input_ids"].shape[1]:] != tok.pad_token_id).sum())
    return {"mode": "peft", "requests": len(models), "max_batch": len(models), "adapters": len(set(models)),
            "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "p50_s": wall, "p90_s": wall}


# ---- serving latency beside a training job ----------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latency_round(url: str, n: int) -> dict:
    """`n` short chat requests to the base, one after another: p50 and p95 of their latency."""
    latencies = []
    with httpx.Client(timeout=600) as client:
        for i in range(n):
            body = {"model": "smollm2", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            start = time.perf_counter()
            r = client.post(url + "/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                raise RuntimeError(f"chat failed: {r.status_code} {r.text[:200]}")
    return {"p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95)}


def run_training_latency(args) -> dict:
    """Idle rounds, then rounds while a QLoRA job trains in `qforge serve --jobs`'s worker."""
    import os
    import socket
    import subprocess

    from tests.jobs.helpers import chat_rows, jsonl

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "qforge", "serve", "--base", "smollm2", "--jobs", "--data-dir", f"{tmp}/data",
               "--port", str(port), "--dtype", args.dtype, "--log-level", "warning"]
        if args.worker_threads:
            cmd += ["--worker-threads", str(args.worker_threads)]
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "QFORGE_API_KEY": "", "HF_HUB_OFFLINE": "1"})
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"qforge serve exited {proc.returncode}: "
                                       f"{(Path(tmp) / 'server.log').read_text()[-2000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("qforge serve did not come up")
                time.sleep(0.5)
            split = [line for line in (Path(tmp) / "server.log").read_text().splitlines() if "CPU thread" in line]
            print(split[-1] if split else "(the server did not say how it shares the cores)")
            latency_round(url, 3)  # warm-up
            idle = [latency_round(url, args.latency_requests) for _ in range(args.repeat)]
            up = httpx.post(url + "/files", files={"file": ("train.jsonl", jsonl(chat_rows(64)))},
                            data={"purpose": "fine-tune"}, timeout=120).json()
            hp = {"method": "qlora", "rank": 16, "batch_size": 4, "max_seq_len": 128, "n_epochs": 100,
                  "max_steps": 100000, "save_every": 100000}
            job = httpx.post(url + "/fine_tuning/jobs", timeout=120, json={
                "model": "smollm2", "training_file": up["id"],
                "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}).json()
            deadline = time.monotonic() + 900
            while not any(e["type"] == "metrics" for e in httpx.get(
                    url + f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}, timeout=60).json()["data"]):
                status = httpx.get(url + f"/fine_tuning/jobs/{job['id']}", timeout=60).json()
                if status["status"] in ("failed", "cancelled", "succeeded") or time.monotonic() > deadline:
                    raise RuntimeError(f"the training job never reached its first step: {status}")
                time.sleep(1)
            events = httpx.get(url + f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100},
                               timeout=60).json()["data"]
            print(next((e["message"] for e in events if e["message"].startswith("The training process uses")),
                       "(no thread report)"))
            busy = [latency_round(url, args.latency_requests) for _ in range(args.repeat)]
            status = httpx.get(url + f"/fine_tuning/jobs/{job['id']}", timeout=60).json()["status"]
            if status != "running":
                raise RuntimeError(f"the training job stopped during the measurement: {status}")
            steps = max(e["data"]["step"] for e in httpx.get(url + f"/fine_tuning/jobs/{job['id']}/events",
                                                             params={"limit": 1000}, timeout=60).json()["data"]
                        if e["type"] == "metrics")
            httpx.post(url + f"/fine_tuning/jobs/{job['id']}/cancel", timeout=60)
        finally:
            proc.send_signal(2)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    for phase, rounds in (("idle", idle), ("training", busy)):
        for i, r in enumerate(rounds):
            print(f"latency {phase:<9} round {i}: p50 {r['p50_s']:.3f} s  p95 {r['p95_s']:.3f} s")
    best_idle, best_busy = min(idle, key=lambda r: r["p50_s"]), min(busy, key=lambda r: r["p50_s"])
    print(f"the job trained {steps} step(s) by the end of the measurement")
    return {"idle": best_idle, "training": best_busy}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'mode':<8}{'run':>4}{'requests':>9}{'adapters':>9}{'max_batch':>10}{'tokens':>8}{'wall_s':>9}"
          f"{'tok/s':>9}{'p50_s':>8}{'p90_s':>8}")
    for r in rows:
        print(f"{r['mode']:<8}{r['run']:>4}{r['requests']:>9}{r['adapters']:>9}{r['max_batch']:>10}{r['tokens']:>8}"
              f"{r['wall_s']:>9.2f}{r['tok_per_s']:>9.2f}{r['p50_s']:>8.2f}{r['p90_s']:>8.2f}")


def median_rate(rows: list[dict], mode: str) -> float:
    return statistics.median(r["tok_per_s"] for r in rows if r["mode"] == mode)


def spread(rows: list[dict], mode: str) -> str:
    rates = [r["tok_per_s"] for r in rows if r["mode"] == mode]
    return f"{min(rates):.1f}-{max(rates):.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests per run (default: 32)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    parser.add_argument("--adapters", type=int, default=8, help="adapters the requests spread over (default: 8)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default: 16)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype (default: bfloat16)")
    parser.add_argument("--modes", default="multi,naive,single,peft,training",
                        help="modes to run (default: multi,naive,single,peft,training)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of every mode, interleaved; each mode's best counts (default: 3; at least 3 for "
                             "a recorded figure)")
    parser.add_argument("--latency-requests", type=int, default=20,
                        help="short chat requests per latency round (default: 20)")
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="the training mode's --worker-threads (default: qforge serve's, half the cores)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - {"multi", "naive", "single", "peft", "training"}
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    if args.repeat < 3:
        print(f"note: --repeat {args.repeat}: a recorded figure takes the best of at least 3 runs")

    rows, latency = [], None
    throughput = [m for m in modes if m != "training"]
    if throughput:
        t0 = time.perf_counter()
        model, tokenizer = load_model("smollm2", compute_dtype=getattr(torch, args.dtype))
        print(f"loaded smollm2 ({args.dtype}) in {time.perf_counter() - t0:.1f} s; "
              f"torch threads {torch.get_num_threads()}")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            names = make_adapters(model, root, args.adapters, args.rank)
            registry = AdapterRegistry(model, "smollm2", max_loaded=max(16, args.adapters), adapter_root=root)
            for name in names:
                registry.add(name, name)
            mixed = [names[i % len(names)] for i in range(args.requests)]
            plans = {"multi": (mixed, 32), "naive": (mixed, 1), "single": ([names[0]] * args.requests, 32)}
            peer = None
            if "peft" in throughput:
                from qforge.model.load import smollm2_folder
                peer = load_peft_peer(smollm2_folder(), root, names, getattr(torch, args.dtype))
            for run in range(args.repeat):
                for mode in throughput:
                    if mode == "peft":
                        row = run_peft(peer, mixed, args.max_tokens)
                    else:
                        row = run_mode(model, tokenizer, registry, mode, *plans[mode], args.max_tokens)
                    rows.append(row | {"run": run})
                    print(f"{mode} run {run}: {row['tok_per_s']:.1f} tok/s", flush=True)
        del model, peer
        print_table(rows)
    if "training" in modes:
        latency = run_training_latency(args)
    best = {m: max((r for r in rows if r["mode"] == m), key=lambda r: r["tok_per_s"]) for m in throughput}
    if best:
        print(f"best of {args.repeat} runs: " + ", ".join(f"{m} {best[m]['tok_per_s']:.1f} tok/s" for m in best))
        print(f"median of {args.repeat} interleaved runs (min-max): " + ", ".join(
            f"{m} {median_rate(rows, m):.1f} tok/s ({spread(rows, m)})" for m in best))
        if "multi" in best and "single" in best:
            ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(
                [r for r in rows if r["mode"] == "multi"], [r for r in rows if r["mode"] == "single"])]
            print(f"multi/single per run (same round): {', '.join(f'{q:.2f}' for q in ratios)}; median "
                  f"{statistics.median(ratios):.2f}")
    if latency:
        print(f"serving latency (best of {args.repeat} rounds of {args.latency_requests} requests): idle p50 "
              f"{latency['idle']['p50_s']:.3f} s p95 {latency['idle']['p95_s']:.3f} s; with a job training p50 "
              f"{latency['training']['p50_s']:.3f} s p95 {latency['training']['p95_s']:.3f} s")
    figures = []
    if "multi" in best:
        for other in ("naive", "single", "peft"):
            if other in best:
                figures.append(f"multi_vs_{other}={best['multi']['tok_per_s'] / best[other]['tok_per_s']:.2f}")
        if "single" in best:
            figures.append(f"median_multi_vs_single={median_rate(rows, 'multi') / median_rate(rows, 'single'):.2f}")
        figures.append(f"p50_latency_s={best['multi']['p50_s']:.2f}")
    if latency:
        figures.append(f"serve_p50_with_training_vs_idle={latency['training']['p50_s'] / latency['idle']['p50_s']:.2f}")
    print(" ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
