"""Run the main job on the embedded SmolLM2-135M-Instruct model.

For now: quantise every linear weight of the embedded model to NF4, FP4 and INT4 (with and
without double quantisation) and print the fidelity table (MSE, SQNR, bits per parameter), with
the same figures for Gaussian and Student-t weights for comparison.
"""
from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=1 << 20,
                        help="values drawn for the synthetic Gaussian and Student-t sets (default 2^20)")


def run(args: argparse.Namespace) -> int:
    from ..quant.fidelity import fidelity_table, format_table, standard_datasets

    t0 = time.perf_counter()
    print("qforge demo: 4-bit quantisation fidelity on the embedded SmolLM2-135M-Instruct weights\n")
    sets = standard_datasets(n=args.samples)
    print(f"SmolLM2 set: {sets['smollm2'].numel():,} weights from layers 0, 15 and 29 (all 7 linear layers each)\n")
    rows = fidelity_table(sets)
    print(format_table(rows))
    best = {d: min((r for r in rows if r.dataset == d), key=lambda r: r.mse).fmt for d in sets}
    print(f"\nlowest error per set: {best}  ({time.perf_counter() - t0:.1f} s)")
    return 0
