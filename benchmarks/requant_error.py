"""How much each serving requantisation of a merged model costs: RTN vs GPTQ vs AWQ (int4, W4A16,
groups of 128 / 64) vs FP8 (E4M3, per-channel), against the BF16 merge, on held-out rows.

    .venv/bin/python benchmarks/requant_error.py --adapter runs/demo/adapter [--calibration-rows 128]

1. Loads the embedded SmolLM2 as the adapter was trained on it (NF4), attaches ADAPTER (without
   --adapter a small random one stands in, and the losses then mean little) and writes, with
   qforge.adapters.save_merged: the dense BF16 merge, and --requantize gptq / awq / fp8 folders
   (compressed-tensors format), GPTQ and AWQ calibrated on the first --calibration-rows rows of
   --calibration (default: the demo's training rows).
2. RTN: the BF16 merge with every decoder-block linear rounded to nearest int4, same groups and
   scales convention as the GPTQ/AWQ folders (qforge.quant.awq.fake_int4).
3. On the first --held-out-rows rows of --held-out (default: the demo's test rows, never seen in
   calibration or training), each model in float32 compute: the relative logits MSE against the
   BF16 merge, mean((z - z_bf16)^2) / mean(z_bf16^2) over every position, and the loss (and
   perplexity) on the assistant tokens, as training measures it.

Prints a markdown table and a last line
    gptq_vs_rtn=A awq_vs_rtn=B fp8_vs_bf16=C
(A, B: the method's relative logits MSE over RTN's, below 1 when it beats RTN; C: FP8's relative
logits MSE against the BF16 merge).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import markdown_table  # noqa: E402

DEMO = ROOT / "qforge" / "data" / "demo_task"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=None, help="PEFT adapter trained on smollm2 (default: a random small one)")
    p.add_argument("--calibration", default=str(DEMO / "train.jsonl"), help="calibration rows (training-data file)")
    p.add_argument("--held-out", default=str(DEMO / "test.jsonl"), help="held-out rows (training-data file)")
    p.add_argument("--calibration-rows", type=int, default=128, help="calibration rows for GPTQ/AWQ (default 128)")
    p.add_argument("--held-out-rows", type=int, default=64, help="held-out rows evaluated (default 64)")
    p.add_argument("--device", default="cpu", help="device for calibration and evaluation (default cpu)")
    p.add_argument("--work-dir", default=None, help="where the folders are written (default: a temporary folder)")
    return p.parse_args()


def attach_adapter(model, adapter: str | None, tokenizer) -> str:
    """Load ADAPTER (its chat template into the tokenizer), or a random r=8 one; its name."""
    from qforge.adapters import load_adapter
    from qforge.model.surgery import add_adapter, adapted_layers
    from qforge.model.templates import saved_template
    from qforge.nn import LoraSpec

    if adapter:
        template = saved_template(adapter)
        if template:
            tokenizer.chat_template = template
        return load_adapter(model, adapter)
    add_adapter(model, "default", LoraSpec(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            b = layer.adapters["default"].lora_B.weight
            b.copy_(torch.randn(b.shape, generator=g).to(b.device) * 0.002)
    return "default"


def rows_of(path: str, tokenizer, n: int, train_on: str) -> list[dict]:
    from qforge.train.data import load_rows, tokenize_example
    rows, fmt = load_rows(path)
    return [tokenize_example(r, tokenizer, fmt, 512, train_on=train_on) for r in rows[:n]]


def rtn_model(dense_folder: Path, device):
    """The BF16 merge (float32 compute) with decoder-block linears rounded to nearest int4."""
    from transformers import AutoModelForCausalLM
    from qforge.quant.awq import fake_int4
    from qforge.quant.int4_groups import group_size_for

    model = AutoModelForCausalLM.from_pretrained(str(dense_folder), dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(fake_int4(m.weight, group_size_for(m.in_features), torch.bfloat16))
    return model


@torch.no_grad()
def evaluate(model, examples: list[dict], reference: list[torch.Tensor] | None, device):
    """(logits per row on the CPU, relative logits MSE vs reference or None, assistant-token loss)."""
    out, num, den, nll, count = [], 0.0, 0.0, 0.0, 0
    for i, ex in enumerate(examples):
        ids = torch.tensor([ex["input_ids"]], device=device)
        z = model(input_ids=ids).logits[0].float().cpu()
        out.append(z)
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        if keep.any():
            nll += float(torch.nn.functional.cross_entropy(z[:-1][keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
        if reference is not None:
            num += float((z - reference[i]).pow(2).sum())
            den += float(reference[i].pow(2).sum())
    return out, (num / den if reference is not None else 0.0), nll / max(count, 1)


def main() -> int:
    args = parse_args()
    from transformers import AutoModelForCausalLM
    from qforge.adapters import save_merged
    from qforge.model.compressed import load_compressed_tensors
    from qforge.model.load import load_quantised_base

    device = torch.device(args.device)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="requant_error_"))
    model, tokenizer = load_quantised_base("smollm2", device)
    name = attach_adapter(model, args.adapter, tokenizer)
    model.eval()
    calibration = [e["input_ids"] for e in rows_of(args.calibration, tokenizer, args.calibration_rows, "all")]
    held = rows_of(args.held_out, tokenizer, args.held_out_rows, "assistant")
    folders, seconds = {}, {}
    for scheme in ("bf16", "gptq", "awq", "fp8"):
        t0 = time.perf_counter()
        folders[scheme] = save_merged(model, tokenizer, work / scheme, name=name, dtype=torch.bfloat16,
                                      requantize=None if scheme == "bf16" else scheme,
                                      calibration=calibration, progress=True)
        seconds[scheme] = time.perf_counter() - t0
    del model
    bf16 = AutoModelForCausalLM.from_pretrained(str(folders["bf16"]), dtype=torch.float32).to(device).eval()
    reference, _, loss = evaluate(bf16, held, None, device)
    results = {"bf16": (0.0, loss)}
    del bf16
    results["rtn"] = evaluate(rtn_model(folders["bf16"], device), held, reference, device)[1:]
    for scheme in ("gptq", "awq", "fp8"):
        results[scheme] = evaluate(load_compressed_tensors(folders[scheme], torch.float32, device), held,
                                   reference, device)[1:]
    table = [[s, f"{mse:.3e}", f"{loss:.4f}", f"{math.exp(loss):.3f}",
              f"{seconds.get(s, 0.0):.0f}" if s in seconds else "-"] for s, (mse, loss) in results.items()]
    print(f"smollm2 + {'adapter ' + args.adapter if args.adapter else 'a random r=8 adapter'}; "
          f"{len(calibration)} calibration rows, {len(held)} held-out rows; device {device}")
    print(markdown_table(["model", "relative logits MSE vs BF16 merge", "held-out loss", "perplexity",
                          "write s"], table))
    rtn = results["rtn"][0]
    print(f"gptq_vs_rtn={results['gptq'][0] / rtn:.3f} awq_vs_rtn={results['awq'][0] / rtn:.3f} "
          f"fp8_vs_bf16={results['fp8'][0]:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
