"""Quantise / dequantise speed of qforge against bitsandbytes, side by side, on one CPU.

    .venv/bin/python benchmarks/quant_speed.py [--size 4096] [--repeats 20]

A 4096x4096 bf16 weight, NF4, blocksize 64, with and without double quantisation; medians of
repeated runs. The memory-bandwidth yardstick is a plain copy_ of the bf16 output. Last line:
quantize_vs_bnb=X dequantize_vs_bnb=Y dequantize_vs_memcpy=Z (speed ratios, default settings:
NF4 + double quant; qforge dequantising into a reusable buffer as its layers do on every step,
bitsandbytes the only way its CPU backend can (a new tensor each call: it has no CPU `out=` kernel);
above 1 means qforge is faster; for memcpy, the fraction of copy speed). The table and the line
before the last also give the like-for-like case, both libraries allocating a new output each call.
"""
import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown_table, median_time  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import bitsandbytes.functional as bnbF

    from qforge.quant import dequantize, quantize

    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
    out = torch.empty_like(w)
    src = torch.empty_like(w).normal_()
    t_copy = median_time(lambda: out.copy_(src), args.repeats)
    rows, ratios = [], {}
    for dq in (False, True):
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        state = quantize(w, "nf4", 64, dq)
        assert torch.equal(state.packed, packed) and torch.equal(dequantize(state), bnbF.dequantize_4bit(packed, qs))
        t = {
            "quantize qforge": median_time(lambda: quantize(w, "nf4", 64, dq), max(3, args.repeats // 4)),
            "quantize bitsandbytes": median_time(
                lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4"),
                max(3, args.repeats // 4)),
            "dequantize qforge (new tensor)": median_time(lambda: dequantize(state), args.repeats),
            "dequantize bitsandbytes (new tensor)": median_time(lambda: bnbF.dequantize_4bit(packed, qs), args.repeats),
            "dequantize qforge (out=)": median_time(lambda: dequantize(state, out=out), args.repeats),
        }
        assert torch.equal(dequantize(state, out=torch.empty_like(w)), bnbF.dequantize_4bit(packed, qs))
        label = "nf4+dq" if dq else "nf4"
        rows += [[label, k, f"{v * 1e3:.2f}"] for k, v in t.items()]
        ratios[dq] = (t["quantize bitsandbytes"] / t["quantize qforge"],
                      t["dequantize bitsandbytes (new tensor)"] / t["dequantize qforge (out=)"],
                      t_copy / t["dequantize qforge (out=)"],
                      t["dequantize bitsandbytes (new tensor)"] / t["dequantize qforge (new tensor)"])
    rows.append(["-", "copy_ of the bf16 output", f"{t_copy * 1e3:.2f}"])
    print(f"{args.size}x{args.size} bf16, blocksize 64, torch threads {torch.get_num_threads()}")
    print(markdown_table(["format", "operation", "median ms"], rows))
    q, d, m, a = ratios[False]
    print(f"without double quant: quantize_vs_bnb={q:.2f} dequantize_vs_bnb={d:.2f} dequantize_vs_memcpy={m:.2f}")
    q, d, m, a = ratios[True]
    print(f"into a new tensor each call (page faults included on both sides): dequantize_vs_bnb={a:.2f}")
    print(f"quantize_vs_bnb={q:.2f} dequantize_vs_bnb={d:.2f} dequantize_vs_memcpy={m:.2f}")


if __name__ == "__main__":
    main()
