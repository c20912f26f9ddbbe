"""--offload-base on the embedded model (SmolLM2-135M, 30 blocks): the bytes of 4-bit base on the
device at once against the whole 4-bit base, and the loss curve against the run without it.

    python benchmarks/offload_base.py [--device cpu|cuda] [--steps 2]

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

from qforge.train.config import TrainConfig  # noqa: E402
from qforge.train.run import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def train(device: str, steps: int, offload: bool, out: Path):
    """(run, losses, peak GPU bytes or None) of one short demo run."""
    cfg = TrainConfig.from_yaml(ROOT / "configs" / "demo.yaml", {
        "max_steps": steps, "batch_size": 2, "max_seq_len": 64, "eval_data": None, "eval_every": 0, "save_every": 0,
        "dropout": 0.0, "device": device, "output_dir": str(out), "offload_base": offload,
        "data": str(ROOT / "qforge" / "data" / "demo_task" / "train.jsonl")})
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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        _, plain, plain_peak = train(args.device, args.steps, False, Path(tmp) / "plain")
        run, losses, peak = train(args.device, args.steps, True, Path(tmp) / "offload")
    off = run.model.base_offload
    print(f"blocks={len(off.blocks)} block_bytes={off.block_bytes[0]} max_resident_blocks={off.max_resident} "
          f"misses={off.misses} losses={losses} plain_losses={plain}")
    if peak is not None:
        print(f"gpu_peak_allocated_offload={peak} gpu_peak_allocated_plain={plain_peak}")
    print(f"offload_resident_bytes={off.peak_bytes} base_bytes={off.host_bytes} "
          f"resident_share={off.peak_bytes / off.host_bytes:.4f} losses_equal={losses == plain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
