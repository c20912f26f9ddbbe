"""Each rank's host memory while it loads a model for a run of N processes (gloo on the CPU).

    .venv/bin/python benchmarks/sharded_load.py --model smollm2 --nproc 1,2,4
    .venv/bin/python benchmarks/sharded_load.py --model tinyllama --nproc 1,2,4

N=1 is the one-process training load (qforge.train.run: the whole 4-bit model, adapters, switches);
N>1 runs N processes, each loading with qforge.dist.load (block by block, each block sharded as
soon as it is read) and the training run's set-up (qforge.train.sharded_load). "tinyllama" is a
random checkpoint of TinyLlama-1.1B's shape in bf16 (benchmarks/load_memory.py writes it once under
$QFORGE_CACHE/bench). Each rank reports:
  held      the bytes of tensors it holds once loaded (its shards, what stays whole)
  peak      the most it held while loading (sampled with a block whole, just before it is sharded,
            and at the root), counted tensor by tensor (qforge.dist.load.held_tensor_bytes); for
            N=1 the loaded model (its transient, one tensor at a time, is not counted)
  anon      its anonymous memory's peak while loading (RssAnon sampled every 5 ms by a thread)
            minus RssAnon before loading (imports done): what loading cost the process
Last line: load_peak_N_vs_1=X (the largest rank's peak over N=1's) for every N>1, and
anon_peak_N_vs_1=Y (the same for the anonymous memory added).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, status_bytes  # noqa: E402
from load_memory import NAME, AnonSampler, write_checkpoint  # noqa: E402

MiB = 2 ** 20


def tinyllama_folder() -> Path:
    from qforge.paths import cache_dir
    folder = cache_dir("bench") / NAME
    if not (folder / "config.json").is_file():
        write_checkpoint(folder)
    return folder


def config(model: str):
    from qforge.train.config import TrainConfig
    return TrainConfig(model=model, seed=0)  # the defaults: nf4, double quantisation, bf16, r=16 all-linear


def load_one_process(cfg) -> dict:
    """The one-process training load without the tokenizer: base, adapters, switches."""
    import torch

    from qforge.dist.load import held_tensor_bytes
    from qforge.train.run import _quantised_base, _setup_training_switches, attach_adapters

    torch.manual_seed(cfg.seed)
    model, _ = _quantised_base(cfg, torch.device("cpu"))
    attach_adapters(model, cfg)
    _setup_training_switches(model, cfg, torch.device("cpu"))
    held = held_tensor_bytes(model)
    return {"held": held, "peak": held}


def load_sharded_rank(cfg, group) -> dict:
    import torch

    from qforge.dist.load import LoadMeter, load_sharded
    from qforge.train.sharded_load import _Switches

    torch.manual_seed(cfg.seed)
    meter, switches = LoadMeter(), _Switches(cfg, group)
    dtype = getattr(torch, cfg.compute_dtype)
    load_sharded(cfg.model, group, {"quant_type": cfg.quant_type, "blocksize": 64, "double_quant": cfg.double_quant},
                 dtype, dtype, cfg.target_modules, False, None, switches.skeleton, switches.block, switches.root, meter)
    return {"held": meter.held_after, "peak": meter.peak_held, "largest_block": meter.largest_transient}


def rank_main(rank: int, world: int, port: int, model: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch
    torch.set_num_threads(1)
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the baseline)

    from qforge.dist import init_group
    from qforge.dist.load import load_sharded  # noqa: F401
    from qforge.dist.shard import shard_block  # noqa: F401
    group = init_group(timeout_s=1800)
    sampler = AnonSampler()
    sampler.start()
    cfg = config(model)
    out = load_sharded_rank(cfg, group) if world > 1 else load_one_process(cfg)
    sampler.stop()
    out.update(rank=rank, anon=sampler.peak - sampler.first, vmhwm=status_bytes("VmHWM"))
    queue.put(out)
    if world > 1:
        group.barrier()
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, model: str) -> list[dict]:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, model, queue)) for r in range(world)]
    for p in procs:
        p.start()
    outs = sorted((queue.get(timeout=3600) for _ in procs), key=lambda o: o["rank"])
    for p in procs:
        p.join(timeout=120)
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a rank of the {world}-process load failed: exit codes {[p.exitcode for p in procs]}")
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (the embedded model), tinyllama (a random TinyLlama-1.1B-shaped checkpoint) "
                         "or a model folder")
    ap.add_argument("--nproc", default="1,2,4", help="comma-separated process counts (1 first: the reference)")
    ap.add_argument("--json", help="also write the records to this file")
    args = ap.parse_args()
    model = str(tinyllama_folder()) if args.model == "tinyllama" else args.model
    counts = [int(n) for n in args.nproc.split(",")]
    records = {n: run(n, model) for n in counts}
    rows = [[n, o["rank"], f"{o['held'] / MiB:.1f}", f"{o['peak'] / MiB:.1f}",
             f"{o.get('largest_block', 0) / MiB:.1f}", f"{o['anon'] / MiB:.1f}", f"{o['vmhwm'] / MiB:.1f}"]
            for n in counts for o in records[n]]
    print(markdown_table(["N", "rank", "held after load MiB", "peak held while loading MiB",
                          "largest block whole MiB", "RssAnon added (peak) MiB", "VmHWM MiB"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({str(n): r for n, r in records.items()}, indent=2))
    if 1 in records:
        one = records[1][0]
        print(" ".join(f"load_peak_{n}_vs_1={max(o['peak'] for o in records[n]) / one['peak']:.3f} "
                       f"anon_peak_{n}_vs_1={max(o['anon'] for o in records[n]) / one['anon']:.3f}"
                       for n in counts if n != 1))


if __name__ == "__main__":
    main()
