"""Quantise / dequantise speed of qforge against bitsandbytes, like for like, on one CPU.

    .venv/bin/python benchmarks/quant_speed.py [--size 4096] [--repeats 30]

A 4096x4096 bf16 weight, NF4, blocksize 64, with and without double quantisation. Every
operation is timed --repeats times (>= 20), the operations interleaved (repeat i of each runs
before repeat i+1 of any, so a slow spell of the machine hits them alike), after 3 untimed calls
each; the table gives the median and the spread (min-max) in milliseconds. Both libraries are
timed the same two ways:

  new tensor  each call allocates its output (a fresh 32 MiB tensor: its page faults included,
              on both sides). The script runs itself with glibc's mmap threshold fixed at
              128 KiB (MALLOC_MMAP_THRESHOLD_), so every such tensor is a new mapping whose pages
              fault in: with glibc's default, which raises the threshold after the first free,
              a freed 32 MiB block is sometimes reused warm and a side's median fell to ~1 ms
              or stayed at ~11 ms by chance (one run read dequantize_vs_bnb=9.82 without
              double quantisation and 1.06 with it)
  out=        each call writes into one reused output buffer (what qforge's 4-bit layers do on
              every forward and backward). bitsandbytes' CPU backend has no kernel for
              `dequantize_4bit.out` (0.50: NotImplementedError); where it has none its row says
              so and the ratio is n/a, it is never replaced by another operation.

Quantisation allocates on both sides (neither takes an output). The memory-bandwidth yardstick
is a plain copy_ of the bf16 output into the reused buffer. Both sides' outputs are checked equal
before timing. Last line (NF4 + double quant, the default; above 1 = qforge faster):
quantize_vs_bnb=X dequantize_vs_bnb=Y dequantize_out_vs_bnb_out=Z dequantize_out_vs_memcpy=W
(Y: both allocating; Z: both into a buffer, or n/a; W: qforge's out= time over copy_'s, as a
speed: the fraction of copy speed).
"""
import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import markdown_table  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def interleaved_times(ops: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """{name: [seconds per call] * repeats}, the calls interleaved across ops."""
    for fn in ops.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bnb_out_supported(bnbF, packed, qs, out) -> str | None:
    """None when bitsandbytes can dequantise into `out` on this device, else why not."""
    try:
        bnbF.dequantize_4bit(packed, qs, out=out)
    except (NotImplementedError, RuntimeError) as exc:
        if "Could not run" in str(exc):
            return f"no {packed.device.type} kernel for bitsandbytes::dequantize_4bit.out ({type(exc).__name__})"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="the weight is SIZE x SIZE (default 4096)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per operation, >= 20 (default 30)")
    args = ap.parse_args()
    if args.repeats < 20:
        raise SystemExit(f"--repeats: at least 20, got {args.repeats}")

    import bitsandbytes
    import bitsandbytes.functional as bnbF

    from qforge.quant import dequantize, quantize

    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
    out = torch.empty_like(w)
    src = torch.empty_like(w).normal_()
    rows, results, notes = [], {}, []
    for dq in (False, True):
        label = "nf4+dq" if dq else "nf4"
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        state = quantize(w, "nf4", 64, dq)
        reference = bnbF.dequantize_4bit(packed, qs)
        assert torch.equal(state.packed, packed) and torch.equal(dequantize(state), reference)
        assert torch.equal(dequantize(state, out=torch.empty_like(w)), reference)
        why_not = bnb_out_supported(bnbF, packed, qs, out)
        if why_not is None:
            assert torch.equal(out, reference)
        ops = {
            "quantize qforge": lambda: quantize(w, "nf4", 64, dq),
            "quantize bitsandbytes": lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq,
                                                                quant_type="nf4"),
            "dequantize qforge, new tensor": lambda: dequantize(state),
            "dequantize bitsandbytes, new tensor": lambda: bnbF.dequantize_4bit(packed, qs),
            "dequantize qforge, out=": lambda: dequantize(state, out=out),
            "copy_ into the buffer": lambda: out.copy_(src),
        }
        if why_not is None:
            ops["dequantize bitsandbytes, out="] = lambda: bnbF.dequantize_4bit(packed, qs, out=out)
        times = interleaved_times(ops, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            rows.append([label, k, f"{med[k] * 1e3:.2f}", f"{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}", len(v)])
        if why_not is not None:
            rows.append([label, "dequantize bitsandbytes, out=", "n/a", why_not, 0])
            notes.append(why_not)
        results[dq] = {
            "quantize_vs_bnb": med["quantize bitsandbytes"] / med["quantize qforge"],
            "dequantize_vs_bnb": med["dequantize bitsandbytes, new tensor"] / med["dequantize qforge, new tensor"],
            "dequantize_out_vs_bnb_out": (med["dequantize bitsandbytes, out="] / med["dequantize qforge, out="]
                                          if why_not is None else None),
            "dequantize_out_vs_memcpy": med["copy_ into the buffer"] / med["dequantize qforge, out="],
        }
    print(f"{args.size}x{args.size} bf16, blocksize 64, {args.repeats} interleaved repeats per operation, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, bitsandbytes {bitsandbytes.__version__}")
    print(markdown_table(["format", "operation", "median ms", "spread (min-max ms)", "calls"], rows))

    def line(r):
        return " ".join(f"{k}={v:.2f}" if v is not None else f"{k}=n/a" for k, v in r.items())
    print(f"without double quant: {line(results[False])}")
    print(line(results[True]))


MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in MEASURE_ENV.items()):  # glibc reads it at start-up only
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  {**os.environ, **MEASURE_ENV})
    main()
