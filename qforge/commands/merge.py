"""Merge a PEFT adapter into its base the QLoRA way: dequantise, merge in float32, write a dense model.

The base is loaded and quantised as it was for training (a model folder, a GGUF file, a
bitsandbytes 4-bit folder, or "smollm2"), the adapter is attached, and every adapted layer becomes
dequant(W) + s*B@A (DoRA: m * (W + s*B@A) / ||W + s*B@A||_row) in float32, cast once to --dtype.
A chat template saved with the adapter's tokenizer files (qforge train --chat-template) goes into
the merged model's tokenizer.
The output is a plain transformers folder (no quantization_config), or with --requantize nf4|fp4 a
bitsandbytes 4-bit folder (which rounds the merged weights once more; the rounding is reported).

Merging into the 4-bit weights in place (--in-place) is refused, with the reason. Merging an
adapter into a folder that already carries it is refused too.

  qforge merge --base smollm2 --adapter runs/demo/adapter --out runs/demo/merged
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..devices import DTYPES, add_device_argument, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: a folder, a .gguf file, a 4-bit folder or 'smollm2'")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--name", default=None, help="adapter name inside the model (default: the folder's name)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="dtype of the merged weights (default: bfloat16)")
    add_device_argument(parser)
    parser.add_argument("--requantize", choices=("nf4", "fp4"), default=None,
                        help="write a bitsandbytes 4-bit folder instead of a dense one")
    parser.add_argument("--in-place", action="store_true",
                        help="merge into the 4-bit weights in place: refused, and the error says why")


def _load_base(source: str, device):
    """(model, tokenizer) with the base quantised to 4 bits on `device`; float32 compute, since the
    merge is float32 anyway and the unquantised parameters should reach --dtype with a single rounding."""
    import torch

    from ..model.load import load_model

    return load_model(source, compute_dtype=torch.float32, device=device)


def _write_model_card(out, args: argparse.Namespace) -> None:
    """README.md in the merged folder: base, method, data, steps and losses when the run folder says them."""
    from ..adapters import read_adapter_config
    from ..adapters.model_card import model_card, portable_base_id, write_card

    config = read_adapter_config(args.adapter)
    base = portable_base_id(args.base)
    extra = {"requantized": args.requantize} if args.requantize else {}
    write_card(out, model_card(base, config, "merged", args.adapter, extra))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..adapters import load_adapter, merge_in_place_4bit, read_adapter_config, save_merged
    from ..adapters.merge import PROVENANCE_NAME

    if args.in_place:
        merge_in_place_4bit()  # raises; the CLI prints the explanation
    device = resolve_device(args.device)  # --device cuda without a GPU: one line, first
    read_adapter_config(args.adapter)  # fail on a bad adapter before the (slow) base load
    t0 = time.perf_counter()
    model, tokenizer = _load_base(args.base, device)
    from ..train.templates import saved_template
    template = saved_template(args.adapter)  # the chat template the adapter was trained with, if saved
    if template and tokenizer is not None:
        tokenizer.chat_template = template
    name = load_adapter(model, args.adapter, name=args.name)
    out = save_merged(model, tokenizer, args.out, name=name, dtype=DTYPES[args.dtype],
                      requantize=args.requantize, adapter_source=args.adapter)
    provenance = json.loads((Path(out) / PROVENANCE_NAME).read_text())
    _write_model_card(out, args)
    kind = f"{args.requantize} 4-bit (bitsandbytes format)" if args.requantize else f"dense {args.dtype}"
    print(f"qforge merge: adapter '{name}' from {args.adapter} merged into {args.base}")
    print(f"wrote {kind} model to {out} ({time.perf_counter() - t0:.1f} s)")
    if args.requantize:
        ratio = provenance["requantize_error_over_update"]
        print(f"requantising rounded the merged weights by {ratio:.2f}x the norm of the adapter's update "
              f"({'larger than the update: evaluate before use' if ratio > 1 else 'smaller than the update'})")
    return 0
