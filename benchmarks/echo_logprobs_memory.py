"""Peak memory of an `echo` + `logprobs` request (lm-eval's log-likelihood call) against prompt
length: the prompt scored in one piece (chunk = the prompt: every position's float32 logits and
their log-softmax at once, as the engine did before) vs a chunk of 256 positions at a time (now).

A tiny random Llama (hidden 64, 2 layers, float32) over SmolLM2's 49,152-token vocabulary, so the
logits dominate: one prompt position's float32 logits are 192 KiB. Each (chunk, prompt length)
runs in a fresh subprocess: one short warm-up echo, then the peak resident set is reset
(/proc/self/clear_refs) and one echo request of P tokens runs on the engine thread; the figure is
VmHWM (peak RSS) minus the RSS just before the request: what scoring the prompt added.

    .venv/bin/python benchmarks/echo_logprobs_memory.py [--lengths 1024 2048 4096]

The last line is `peak_mb_whole_4096=X peak_mb_chunked_4096=Y ratio=Z` for the longest prompt.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(length: int, chunk: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import status_bytes
    from qforge.serve import AdapterRegistry, Engine, Request, SamplingParams
    from tests.fixtures import smollm2_tokenizer, tiny_served_llama

    torch.set_num_threads(1)
    tok = smollm2_tokenizer()
    model = tiny_served_llama(tok, context=length + 8)
    engine = Engine(model, tok, AdapterRegistry(model, "tiny"), max_batch=1).start()
    engine.logprob_chunk = chunk

    def echo(n: int) -> None:
        done = threading.Event()
        ids = torch.randint(0, len(tok), (n,), generator=torch.Generator().manual_seed(n)).tolist()
        req = Request(ids, None, SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=True),
                      sink=lambda e: done.set() if e.kind in ("done", "error") else None)
        engine.submit(req)
        done.wait()
        assert req.finish_reason == "length" and len(req.prompt_logprobs) == n, req.text

    echo(16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    echo(length)
    peak = status_bytes("VmHWM")
    engine.stop()
    return {"length": length, "chunk": chunk, "added_mb": round((peak - before) / 2 ** 20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt lengths")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = []
    for length in args.lengths:
        for label, chunk in (("whole", length), ("chunked", 256)):
            out = subprocess.run([sys.executable, __file__, "--child", str(length), str(chunk)], check=True,
                                 capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                                      "PATH": "/usr/bin:/bin"})
            rows.append({"mode": label, **json.loads(out.stdout.strip().splitlines()[-1])})
    print("| prompt tokens | scored in | peak RSS added (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {'one piece' if r['mode'] == 'whole' else '256-position chunks'} | {r['added_mb']} |")
    last = {r["mode"]: r["added_mb"] for r in rows if r["length"] == args.lengths[-1]}
    n = args.lengths[-1]
    print(f"peak_mb_whole_{n}={last['whole']} peak_mb_chunked_{n}={last['chunked']} "
          f"ratio={last['whole'] / max(last['chunked'], 0.1):.1f}")


if __name__ == "__main__":
    main()
