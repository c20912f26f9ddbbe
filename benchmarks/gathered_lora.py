"""The mixed-batch LoRA delta of one serving layer, per implementation (CPU): what a decode step of
`benchmarks/serve_throughput.py` runs in every adapted layer when its rows use different adapters.

For SmolLM2-135M's layer shapes (576 -> 576 / 192 / 1536, 1536 -> 576), 32 decode rows (x [32, 1, in],
bfloat16), rank 16, S adapters in the slots with row b on slot b % S, times (microseconds per call, the
fastest of 5 batches of --calls calls, one thread unless --threads):

  base      the dense bf16 product x W^T of the layer (for scale; the served NF4 base costs more)
  single    every row on one adapter: the layer's low-rank helper on the slot's views (no gather)
  gathered  reference.gathered_lora: each row's A and B gathered, then batched products
  concat    reference.concatenated_lora: every slot's factors in two GEMMs, masked per row
  native    cpu.gathered_lora (qf_gathered_lora): each row reads its own slot in place

The last line: `native_vs_gathered=X native_vs_concat=Y native_vs_single=Z` (summed over the shapes at
the largest S; > 1 means native is slower than that one).

  python benchmarks/gathered_lora.py [--slots 8,64] [--calls 100] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qforge.kernels import cpu, reference  # noqa: E402
from qforge.nn import add_low_rank  # noqa: E402

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def best_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="8,64", help="comma-separated adapter counts in the slots (default 8,64)")
    parser.add_argument("--calls", type=int, default=100, help="calls per timed batch (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if cpu.load() is None:
        print("no native library here (no C compiler): nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    rows, r, dt = 32, 16, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    totals = {}
    print(f"{'S':>3} {'shape':>11} {'base':>7} {'single':>7} {'gathered':>9} {'concat':>7} {'native':>7}  (us)")
    for S in (int(s) for s in args.slots.split(",")):
        totals = dict.fromkeys(("base", "single", "gathered", "concat", "native"), 0.0)
        for n_in, n_out in SHAPES:
            x = torch.randn(rows, 1, n_in, generator=g).to(dt)
            A = (torch.randn(S, r, n_in, generator=g) / 8).to(dt)
            B = (torch.randn(S, n_out, r, generator=g) / 8).to(dt)
            W = torch.randn(n_out, n_in, generator=g).to(dt)
            s, slots = torch.rand(S, generator=g), torch.arange(rows) % S
            out = torch.zeros(rows, 1, n_out, dtype=dt)
            t = {"base": best_us(lambda: torch.nn.functional.linear(x, W), args.calls),
                 "single": best_us(lambda: add_low_rank(out, x, A[0], B[0], s[0]), args.calls),
                 "gathered": best_us(lambda: reference.gathered_lora(x, A, B, slots, s), args.calls),
                 "concat": best_us(lambda: reference.concatenated_lora(x, A, B, slots, s), args.calls),
                 "native": best_us(lambda: cpu.gathered_lora(x, A, B, slots, s), args.calls)}
            for k, v in t.items():
                totals[k] += v
            print(f"{S:>3} {f'{n_in}->{n_out}':>11} {t['base']:>7.0f} {t['single']:>7.0f} {t['gathered']:>9.0f} "
                  f"{t['concat']:>7.0f} {t['native']:>7.0f}", flush=True)
    print(f"native_vs_gathered={totals['native'] / totals['gathered']:.2f} "
          f"native_vs_concat={totals['native'] / totals['concat']:.2f} "
          f"native_vs_single={totals['native'] / totals['single']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
