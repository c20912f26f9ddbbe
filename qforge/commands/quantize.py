"""Write a model folder in bitsandbytes' 4-bit format, or in HQQ's (--quant-type hqq4|hqq3|hqq2).

SOURCE is a Hugging Face model folder (model.safetensors, or shards with an index), a .gguf file,
or "smollm2" (the embedded SmolLM2-135M-Instruct). Weights are streamed one tensor at a time and
every linear layer but lm_head is quantised (NF4 with double quantisation by default); the rest is
kept in --compute-dtype. OUT_DIR (new, or empty) receives config.json with a bitsandbytes
quantization_config, model.safetensors under bitsandbytes' keys, and the tokenizer files. It loads
with transformers + bitsandbytes (AutoModelForCausalLM.from_pretrained(OUT_DIR)) and with qforge,
without being quantised again.

--quant-type hqq4|hqq3|hqq2 writes an HQQ folder instead: config.json with quant_method "hqq" (as
transformers' HqqConfig writes it) and each quantised layer under the `hqq` package's keys
(`P.W_q`, `P.scale`, `P.zero`, `P.nbits`, ...; see qforge.model.checkpoint and qforge.quant.hqq);
qforge loads it as stored.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..devices import DTYPES, add_device_argument, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..quant import BLOCKSIZES

    parser.add_argument("source", help='model folder, .gguf file, or "smollm2"')
    parser.add_argument("out_dir", help="folder to write (must not exist, or be empty)")
    parser.add_argument("--quant-type", choices=("nf4", "fp4", "hqq4", "hqq3", "hqq2"), default="nf4",
                        help="nf4 or fp4 (bitsandbytes 4-bit), or hqq4/hqq3/hqq2 (HQQ at 4, 3 or 2 bits) (default nf4)")
    parser.add_argument("--hqq-group-size", type=int, default=64,
                        help="values per HQQ scale and zero-point; must divide every quantised weight (default 64)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="keep the block scales in float32 instead of quantising them to 8 bits (nf4/fp4 only; "
                             "default: double quantisation on)")
    parser.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64,
                        help="values per quantisation block, a power of two from 32 to 4096 (default 64)")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="dtype of the unquantised tensors and of the 4-bit layers' matmuls (default bfloat16)")
    add_device_argument(parser)


def source_nbytes(source: str) -> int:
    """Bytes of the source's tensors (a GGUF: the file's size)."""
    from ..model.load import SMOLLM2, Checkpoint, smollm2_folder

    if source.lower() == SMOLLM2:
        return Checkpoint(smollm2_folder()).nbytes()
    path = Path(source).expanduser()
    return path.stat().st_size if path.suffix.lower() == ".gguf" else Checkpoint(path).nbytes()


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from ..model.load import SMOLLM2, resolve_path, resolve_source

    source = resolve_source(args.source)
    path, is_gguf = (None, True) if str(source).lower() == SMOLLM2 else \
        resolve_path(source, True, {}, default_targets=False)
    if is_gguf or args.quant_type not in ("nf4", "fp4"):  # GGUF, the embedded model, HQQ: built whole, then written
        return _run_whole(args)
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"'{out}' already exists and is not an empty folder")
    from ..model.stream_quantize import quantize_folder

    t0 = time.perf_counter()
    quant = {"quant_type": args.quant_type, "blocksize": args.blocksize, "double_quant": args.double_quant}
    done = quantize_folder(Path(path), out, quant, DTYPES[args.compute_dtype], resolve_device(args.device),
                           progress=True)
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"\nqforge quantize: {args.source} -> {out}")
    print(f"  layers quantised : {done['layers']} ({args.quant_type}, blocksize {args.blocksize}, "
          f"double quant {'on' if args.double_quant else 'off'}; streamed: one output shard held at a time)")
    print(f"  4-bit weights    : {_mb(done['dense_bytes'])} -> {_mb(done['packed_bytes'])} "
          f"({done['packed_bytes'] / max(done['dense_bytes'], 1):.3f}x)")
    print(f"  checkpoint       : {_mb(source_nbytes(str(path)))} -> {_mb(written)}")
    print(f"  time             : {time.perf_counter() - t0:.1f} s")
    return 0


def _run_whole(args: argparse.Namespace) -> int:
    from ..model.checkpoint import WEIGHTS_NAME, save_quantized
    from ..model.load import load_model
    from ..model.surgery import hqq_layers, quantized_layers

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"'{out}' already exists and is not an empty folder")
    hqq = args.quant_type.startswith("hqq")
    if hqq and args.hqq_group_size < 1:
        raise ValueError(f"--hqq-group-size must be a positive integer, got {args.hqq_group_size}")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.source, quant_type=args.quant_type, double_quant=args.double_quant,
                                  blocksize=args.hqq_group_size if hqq else args.blocksize,
                                  compute_dtype=DTYPES[args.compute_dtype], progress=True, device=device)
    t_load = time.perf_counter() - t0
    save_quantized(model, tokenizer, out)
    compute_bytes = DTYPES[args.compute_dtype].itemsize
    if any(True for _ in hqq_layers(model)):
        states = [m.base.hqq_state for _, m in hqq_layers(model)]
        st = states[0]
        what = f"hqq{st.nbits}, group size {st.group_size}, axis {st.axis}"
        dense = sum(s.numel * compute_bytes for s in states)
    else:
        states = [m.base.quant_state for _, m in quantized_layers(model)]
        st = states[0]
        what = f"{st.quant_type}, blocksize {st.blocksize}, double quant {'on' if st.nested else 'off'}"
        dense = sum(s.numel * s.dtype.itemsize for s in states)
    packed = sum(s.nbytes() for s in states)
    print(f"\nqforge quantize: {args.source} -> {out}")
    print(f"  layers quantised : {len(states)} ({what})")
    print(f"  quantised weights: {_mb(dense)} -> {_mb(packed)} ({packed / dense:.3f}x, "
          f"{8 * packed / sum(s.numel for s in states):.3f} bits per parameter)")
    print(f"  checkpoint       : {_mb(source_nbytes(args.source))} -> {_mb((out / WEIGHTS_NAME).stat().st_size)}")
    print(f"  time             : {time.perf_counter() - t0:.1f} s (load and quantise {t_load:.1f} s)")
    return 0
