"""Export a fine-tune for llama.cpp and Ollama: the merged model as GGUF, or the adapter as a LoRA GGUF.

--format gguf: the base is loaded and quantised as for training, the adapter attached, and every
adapted layer merged in float32 (as `qforge merge`), then written as one GGUF file (Llama
architecture) with the tokenizer and chat template inside, quantised to --quant. A `Modelfile`
for `ollama create` and a README.md model card are written beside it.

--format gguf-lora: the adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora
FILE`), for a base GGUF with llama.cpp's tensor names (one written by --format gguf, or
llama.cpp's own converter). Only the base's config is read.

  qforge export --base smollm2 --adapter runs/demo/adapter --quant q4_k_m --out runs/demo/model.gguf
  ollama create demo -f runs/demo/Modelfile
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

FORMATS = ("gguf", "gguf-lora")
QUANT_HELP = ("f32 | f16 | q8_0 | q4_k_m (llama.cpp's Q4_K_M mix: Q4_K, Q6_K for the output layer and some "
              "attn_v / ffn_down; rows not a multiple of 256 fall back to Q5_0 / Q8_0); gguf-lora: f32 | f16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: a folder, a .gguf file or 'smollm2'")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output .gguf file (replaced atomically)")
    parser.add_argument("--format", choices=FORMATS, default="gguf",
                        help="gguf: the merged model; gguf-lora: the adapter alone (default: gguf)")
    parser.add_argument("--quant", default="f16", choices=("f32", "f16", "q8_0", "q4_k_m"),  # export_gguf.QUANTS
                        help=f"tensor type (default: f16): {QUANT_HELP}")
    parser.add_argument("--name", default=None, help="model name stored in the file (default: the output's stem)")


def _base_gguf(source: str) -> Path | None:
    """The GGUF file a base came from ('smollm2' -> the embedded file), whose tokenizer we copy."""
    if source.lower() == "smollm2":
        from ..model.embedded import smollm2_gguf_path
        return smollm2_gguf_path()
    path = Path(source)
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def _base_config(source: str):
    """The base's transformers config, without loading its weights."""
    from transformers import AutoConfig

    gguf = _base_gguf(source)
    if gguf is not None:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"base '{source}': no config.json (expected a model folder, a .gguf file or 'smollm2')")
    return AutoConfig.from_pretrained(source)


def modelfile_text(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    """An Ollama Modelfile: FROM the file, for a ChatML template Ollama's own TEMPLATE, and a stop on
    the template's end of turn (end_of_turn_token) and on eos."""
    from ..model.templates import end_of_turn_token

    lines = [f"FROM ./{gguf_name}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system', "{{ .System }}<|im_end|>", "{{ end }}",
                  "{{- range .Messages }}<|im_start|>{{ .Role }}", "{{ .Content }}<|im_end|>", "{{ end }}",
                  '<|im_start|>assistant', '"""']
    for stop in dict.fromkeys(t for t in (end_of_turn_token(chat_template), eos_token) if t):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def _export_merged(args: argparse.Namespace, out: Path, name: str) -> None:
    from ..adapters import load_adapter
    from ..adapters.export_gguf import export_merged_gguf
    from ..fileio import atomic_write_bytes
    from ..model.load import load_quantised_base
    from ..model.templates import saved_template
    from .merge import trained_quant

    # the base dequantised as the adapter was trained on it (nf4, or an HQQ base: the run's config.yaml)
    quant_type, group_size = trained_quant(args.adapter)
    hqq = {"quant_type": quant_type, "group_size": group_size} if quant_type != "nf4" else {}
    model, tokenizer = load_quantised_base(args.base, None, **hqq)
    adapter = load_adapter(model, args.adapter)
    tok_gguf = _base_gguf(args.base)
    if tokenizer is None and tok_gguf is None:
        raise ValueError(f"base '{args.base}' has no tokenizer files; llama.cpp needs the tokenizer inside the GGUF")
    trained = saved_template(args.adapter)  # the template the adapter was trained with, and its stop
    export_merged_gguf(model, tokenizer, out, adapter, args.quant, name, tokenizer_gguf=tok_gguf,
                       chat_template=trained)
    modelfile = out.parent / "Modelfile"
    if not modelfile.exists() or modelfile.read_text(errors="replace").startswith(f"FROM ./{out.name}"):
        template = trained or getattr(tokenizer, "chat_template", None)
        eos = getattr(tokenizer, "eos_token", None)
        atomic_write_bytes(modelfile, modelfile_text(out.name, template, eos).encode())
        print(f"wrote {modelfile} (ollama create NAME -f {modelfile})")
    else:
        print(f"left {modelfile} alone: it is not for {out.name}")


def run(args: argparse.Namespace) -> int:
    from ..adapters import read_adapter_config
    from ..adapters.export_gguf import LORA_QUANTS, QUANTS, write_lora_gguf
    from ..adapters.model_card import model_card, portable_base_id, write_card
    from ..adapters.peft_format import read_adapter_tensors

    allowed = QUANTS if args.format == "gguf" else LORA_QUANTS
    if args.quant not in allowed:
        raise ValueError(f"--quant {args.quant!r} is not one of {list(allowed)} for --format {args.format}")
    out = Path(args.out)
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"--out '{out}' must name a .gguf file")
    config = read_adapter_config(args.adapter)  # fail on a bad adapter before the (slow) base load
    name = args.name or out.stem
    t0 = time.perf_counter()
    if args.format == "gguf-lora":
        write_lora_gguf(out, config, read_adapter_tensors(args.adapter), _base_config(args.base), args.quant, name)
    else:
        _export_merged(args, out, name)
    card = model_card(portable_base_id(args.base), config, "gguf" if args.format == "gguf" else "adapter",
                      args.adapter, {"GGUF file": f"{out.name} ({args.format}, {args.quant})"})
    if write_card(out.parent, card) is None:
        print(f"left {out.parent / 'README.md'} alone: it was not written by qforge")
    size = out.stat().st_size / 2 ** 20
    print(f"qforge export: wrote {out} ({args.format}, {args.quant}, {size:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return 0
