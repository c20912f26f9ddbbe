"""Merge a PEFT adapter into its base the QLoRA way: dequantise, merge in float32, write a dense model.

The base is loaded and quantised as it was for training (a model folder, a GGUF file, a
bitsandbytes 4-bit folder, or "smollm2"), the adapter is attached, and every adapted layer becomes
dequant(W) + s*B@A (DoRA: m * (W + s*B@A) / ||W + s*B@A||_row) in float32, cast once to --dtype.
A chat template saved with the adapter's tokenizer files (qforge train --chat-template) goes into
the merged model's tokenizer.
The output is a plain transformers folder (no quantization_config), or with --requantize nf4|fp4 a
bitsandbytes 4-bit folder, or with --requantize hqq4|hqq3|hqq2 an HQQ folder (qforge.model.checkpoint),
or with --requantize gptq|awq|fp8 a compressed-tensors folder for vLLM / SGLang (W4A16 int4 groups of
128 by GPTQ or AWQ, calibrated on --calibration rows or the adapter's own training data; FP8 E4M3
weights with per-channel scales); each rounds the merged weights once more, and the rounding is reported.

The base is dequantised as the adapter was trained on it: --base-quant-type auto reads quant_type
(and hqq_group_size) from the run's config.yaml beside the adapter folder (nf4 when there is none);
an HQQ or bitsandbytes folder given as --base is read as stored.

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
from ..model.load import load_quantised_base


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: a folder, a .gguf file, a 4-bit folder or 'smollm2'")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--name", default=None, help="adapter name inside the model (default: the folder's name)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="dtype of the merged weights (default: bfloat16)")
    add_device_argument(parser)
    parser.add_argument("--requantize", choices=("nf4", "fp4", "hqq4", "hqq3", "hqq2", "gptq", "awq", "fp8"),
                        default=None,
                        help="write a quantised folder instead of a dense one: nf4/fp4 (bitsandbytes 4-bit), "
                             "hqq4/hqq3/hqq2 (HQQ, the hqq package's keys), or for vLLM/SGLang the "
                             "compressed-tensors format: gptq/awq (W4A16, int4 groups of 128, calibrated) or fp8 "
                             "(E4M3 weights, per-channel scales) (default: none, dense)")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="calibration data for --requantize gptq/awq: a training-data file (JSONL chat, "
                             "instruction, completion or text rows) (default: the adapter's training data, read "
                             "from the run's config.yaml beside --adapter)")
    parser.add_argument("--calibration-rows", type=int, default=128, metavar="N",
                        help="calibration rows used for --requantize gptq/awq, the file's first N (default: 128)")
    parser.add_argument("--base-quant-type", choices=("auto", "nf4", "fp4", "hqq4", "hqq3", "hqq2"), default="auto",
                        help="how the base was quantised for training, so it is dequantised the same way: auto "
                             "reads the run's config.yaml beside --adapter, else nf4 (default: auto)")
    parser.add_argument("--hqq-group-size", type=int, default=None,
                        help="group size of an HQQ base and of --requantize hqq* (default: the run's "
                             "hqq_group_size, else 64)")
    parser.add_argument("--in-place", action="store_true",
                        help="merge into the 4-bit weights in place: refused, and the error says why")


def trained_quant(adapter_dir, quant_type: str = "auto", group_size: int | None = None) -> tuple[str, int]:
    """(quant type, HQQ group size) the adapter was trained against: those given, else the run's
    config.yaml beside the adapter folder (what `qforge train` writes), else (nf4, 64)."""
    run_cfg: dict = {}
    if quant_type == "auto" or group_size is None:
        try:
            import yaml
            run_cfg = yaml.safe_load((Path(adapter_dir).parent / "config.yaml").read_text()) or {}
        except (OSError, ValueError, AttributeError):
            run_cfg = {}
        run_cfg = run_cfg if isinstance(run_cfg, dict) else {}
    if quant_type == "auto":
        quant_type = str(run_cfg.get("quant_type") or "nf4")
    if group_size is None:
        group_size = int(run_cfg.get("hqq_group_size") or 64)
    if group_size < 1:
        raise ValueError(f"--hqq-group-size must be a positive integer, got {group_size}")
    return quant_type, group_size


def _run_config(adapter_dir) -> dict:
    """The run's config.yaml beside the adapter folder (what `qforge train` writes), or {}."""
    try:
        import yaml
        cfg = yaml.safe_load((Path(adapter_dir).parent / "config.yaml").read_text()) or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def calibration_source(args: argparse.Namespace) -> tuple[str, str, int] | None:
    """(file, data format, max tokens per row) of the calibration rows for --requantize gptq/awq:
    --calibration, else the adapter's training data (config.yaml's `data` beside --adapter), read
    with the run's data_format and max_seq_len (else auto, 512). None for other --requantize values.
    ValueError (one line, naming the flag) when there is none or it is missing: checked before the
    slow base load."""
    if args.requantize not in ("gptq", "awq"):
        return None
    if args.calibration_rows < 1:
        raise ValueError(f"--calibration-rows must be a positive integer, got {args.calibration_rows}")
    run_cfg = _run_config(args.adapter)
    path = args.calibration or run_cfg.get("data")
    if not path:
        raise ValueError(f"--requantize {args.requantize} needs calibration data: no training data is recorded "
                         f"beside '{args.adapter}' (config.yaml 'data'); pass --calibration FILE (a JSONL file in "
                         "any training-data format)")
    if not Path(path).exists():
        where = "--calibration" if args.calibration else f"the adapter's training data (config.yaml beside {args.adapter})"
        raise ValueError(f"{where}: '{path}' not found; pass --calibration FILE")
    fmt = "auto" if args.calibration else str(run_cfg.get("data_format") or "auto")
    return str(path), fmt, int(run_cfg.get("max_seq_len") or 512)


def calibration_rows(source: tuple[str, str, int] | None, tokenizer, n: int) -> list[list[int]] | None:
    """The first `n` rows of the calibration source as token ids, tokenised as training does with
    every token kept (train_on="all"), at most the source's max tokens each."""
    if source is None:
        return None
    if tokenizer is None:
        raise ValueError("--requantize gptq/awq needs the base's tokenizer to read calibration rows; the base has none")
    from ..train.data import load_rows, tokenize_example

    path, fmt, max_len = source
    rows, fmt = load_rows(path, fmt)
    ids = [tokenize_example(r, tokenizer, fmt, max_len, train_on="all")["input_ids"] for r in rows[:n]]
    return [r for r in ids if r]


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
    source = calibration_source(args)  # and on missing calibration data
    t0 = time.perf_counter()
    quant_type, group_size = trained_quant(args.adapter, args.base_quant_type, args.hqq_group_size)
    hqq = {"quant_type": quant_type, "group_size": group_size} if quant_type != "nf4" else {}
    model, tokenizer = load_quantised_base(args.base, device, **hqq)
    from ..model.templates import saved_template
    template = saved_template(args.adapter)  # the chat template the adapter was trained with, if saved
    if template and tokenizer is not None:
        tokenizer.chat_template = template
    name = load_adapter(model, args.adapter, name=args.name)
    calibration = calibration_rows(source, tokenizer, args.calibration_rows)
    out = save_merged(model, tokenizer, args.out, name=name, dtype=DTYPES[args.dtype],
                      requantize=args.requantize, adapter_source=args.adapter,
                      group_size=args.hqq_group_size, calibration=calibration, progress=True)
    provenance = json.loads((Path(out) / PROVENANCE_NAME).read_text())
    _write_model_card(out, args)
    kind = _kind(args)
    print(f"qforge merge: adapter '{name}' from {args.adapter} merged into {args.base}")
    print(f"wrote {kind} model to {out} ({time.perf_counter() - t0:.1f} s)")
    if args.requantize:
        ratio = provenance["requantize_error_over_update"]
        print(f"requantising rounded the merged weights by {ratio:.2f}x the norm of the adapter's update "
              f"({'larger than the update: evaluate before use' if ratio > 1 else 'smaller than the update'})")
    return 0


def _kind(args: argparse.Namespace) -> str:
    """What was written, in words, for the summary line."""
    q = args.requantize
    if not q:
        return f"dense {args.dtype}"
    if q.startswith("hqq"):
        return f"{q} (HQQ format)"
    if q in ("gptq", "awq"):
        return f"{q} W4A16 (compressed-tensors pack-quantized, for vLLM / SGLang)"
    if q == "fp8":
        return "fp8 E4M3 weights (compressed-tensors float-quantized, for vLLM / SGLang)"
    return f"{q} 4-bit (bitsandbytes format)"
