"""--offload-base on the embedded model (SmolLM2-135M, 30 blocks), or with --moe on a random
Mixtral-shaped model with 4-bit expert banks (MOE_SHAPE: 8 blocks of 8 experts, top-2, SmolLM2's
tokenizer): the bytes of 4-bit base on the device at once against the whole 4-bit base (the expert
banks' share of it printed too), and the loss curve against the run without it.

    python benchmarks/offload_base.py [--device cpu|cuda] [--steps 2] [--moe]

Both runs go through the training-run API (qforge.train.run.prepare) with the demo recipe, short
rows (max_seq_len 64, batch 2) and no dropout. On the CPU the "device" copies are fresh host tensors
(the mechanism, no saving); on CUDA the line adds each run's peak of allocated GPU memory. Ends with
`offload_resident_bytes=R base_bytes=B resident_share=R/B losses_equal=True|False`."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qforge.nn.offloaded_experts import OffloadedExpertBank  # noqa: E402
from qforge.train.config import TrainConfig  # noqa: E402
from qforge.train.run import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# --moe: Mixtral's layout at a size the CPU trains in seconds (SmolLM2's vocabulary, for its tokenizer)
MOE_SHAPE = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                 max_position_embeddings=256, tie_word_embeddings=False)


def moe_folder(folder: Path) -> Path:
    """A random bf16 Mixtral of MOE_SHAPE (seed 0) with SmolLM2's tokenizer, written to `folder`."""
    import shutil

    from transformers import AutoModelForCausalLM, MixtralConfig

    from qforge.model.load import smollm2_folder
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MixtralConfig(**MOE_SHAPE), dtype=torch.bfloat16).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder() / name, folder / name)
    return folder


def train(device: str, steps: int, offload: bool, out: Path, model: Path | None = None):
    """(run, losses, peak GPU bytes or None) of one short demo run (on `model`'s folder when given)."""
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml", {
        "max_steps": steps, "batch_size": 2, "max_seq_len": 64, "eval_data": None, "eval_every": 0, "save_every": 0,
        "dropout": 0.0, "device": device, "output_dir": str(out), "offload_base": offload,
        "data": str(ROOT / "qforge" / "data" / "demo_task" / "train.jsonl"),
        **({"model": str(model)} if model is not None else {})})
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = prepare(cfg, log=lambda *_: None)
    losses = run.train().losses
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return run, losses, peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps of each run (default: 2)")
    parser.add_argument("--moe", action="store_true",
                        help="a random Mixtral-shaped model (4-bit expert banks) instead of the embedded model")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = moe_folder(Path(tmp) / "mixtral") if args.moe else None
        _, plain, plain_peak = train(args.device, args.steps, False, Path(tmp) / "plain", model)
        run, losses, peak = train(args.device, args.steps, True, Path(tmp) / "offload", model)
    off = run.model.base_offload
    experts = sum(b.nbytes() for bases in off.bases for b in bases if isinstance(b, OffloadedExpertBank))
    print(f"blocks={len(off.blocks)} block_bytes={off.block_bytes[0]} max_resident_blocks={off.max_resident} "
          f"misses={off.misses} expert_bank_bytes={experts} losses={losses} plain_losses={plain}")
    if peak is not None:
        print(f"gpu_peak_allocated_offload={peak} gpu_peak_allocated_plain={plain_peak}")
    print(f"offload_resident_bytes={off.peak_bytes} base_bytes={off.host_bytes} "
          f"resident_share={off.peak_bytes / off.host_bytes:.4f} losses_equal={losses == plain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
