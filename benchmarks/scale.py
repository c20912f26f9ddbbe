"""What each rank of a sharded QLoRA run holds, at N = 1, 2 and 4 processes (torch.distributed, gloo).

    python benchmarks/scale.py [--models smollm2,tinyllama] [--nprocs 1,2,4] [--steps 3] [--cache DIR]
    python benchmarks/scale.py --device cuda --models smollm2 --nprocs 1,2      (benchmarks/gpu_check.sh, 2 GPUs)

Two models: the embedded SmolLM2-135M and a random TinyLlama-1.1B-shaped Llama (hidden 2048, 22
layers, intermediate 5632, 32 heads / 4 KV heads, vocab 32000, untied head), built once with
transformers (seed 0, bf16 safetensors in 500 MB shards, SmolLM2's tokenizer) under DIR (default
$QFORGE_CACHE/bench). Each (model, N) is one torchrun launch of this script (`--worker`), which
trains as `qforge train` does (qforge.train.run.prepare, then Run.train) with: QLoRA r=16 all-linear,
NF4 + double quantisation, float32 compute (so that the loss curves can be compared to rounding),
dropout 0, paged 8-bit AdamW, gradient checkpointing without kept base products, a global batch of
4 rows of exactly --seq-len tokens (text rows longer than that, truncated: every step the same
shape), OMP_NUM_THREADS=1 per rank, glibc's mmap threshold fixed at 128 KiB (as
benchmarks/plan_calibration.py: every tensor-sized block its own mapping, so the peak is what the
run holds live, the same every time).

Each rank measures itself:
  baseline    VmRSS after the imports and the native kernel library, before any tensor
  load peak   VmHWM during prepare() (read, quantise, shard) minus the baseline
  held        qforge.dist.shard.held_bytes(model, optimizer) taken just before the last optimiser step
              (its gradients and the optimiser state both alive): base (4-bit codes and constants),
              adapters, gradients, optimizer, embeddings (embeddings, output layer, norms, every
              other non-4-bit tensor); computed here from the parameters (local shards) where
              held_bytes does not exist yet
  peak        VmHWM during steps 2.. (reset after step 1 by /proc/self/clear_refs) minus the baseline
  activations peak - sum(held): the saved activations, the gathered blocks FSDP holds while one
              runs, the loss's logits, and whatever else the step allocates
The planner's figure for one rank is qforge.plan.per_rank(...)["total"] (reported when that
function exists), with the CPU constants and 4-byte activations (float32 compute); its error is
(planner - peak) / peak. With --device cuda the ranks run on NCCL, one GPU each, and every memory
figure is torch.cuda's (max_memory_allocated, reset after step 1; baseline 0). The loss of every step at N is compared with
N=1's (max relative difference). Printed: a table per model (MiB), then the last line

    per_rank_peak_4_vs_1=X planner_err_max=Y

X: rank 0's peak at the largest N over its peak at N=1, TinyLlama shape (the first model otherwise);
Y: the largest |planner error| over every model, N and rank (nan without the planner).
Memory figures do not depend on machine load; the wall time does (about 15 min on 2 busy cores).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import markdown_table, status_bytes  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                 rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
TINYLLAMA_NAME = "tinyllama-1.1b-shape-random-bf16"
COMPONENTS = ("base", "adapters", "gradients", "optimizer", "embeddings")
HELD_KEYS = (*COMPONENTS, "experts")  # held_bytes' keys (experts: MoE banks, 0 for these dense models)
SHARDED = ("base", "adapters", "gradients", "optimizer", "embeddings")  # what falls as 1/N once all is sharded
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # benchmarks/plan_calibration.py's
BATCH, RANK = 4, 16
MIB = 2**20


# ---- inputs: the TinyLlama-shaped checkpoint and the rows -----------------------------------------
def tinyllama_folder(cache: Path) -> Path:
    """The random TinyLlama-1.1B-shaped checkpoint (bf16, seed 0), written once under `cache`."""
    folder = cache / TINYLLAMA_NAME
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qforge.model.checkpoint import write_new_folder
    from qforge.model.load import smollm2_folder

    def write(tmp: Path) -> None:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: never a float32 copy of 1.1B
        try:
            model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA, dtype="bfloat16"))
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="500MB")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # SmolLM2's ids of our rows lie under 32000
            shutil.copy(smollm2_folder() / name, tmp / name)

    t0 = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    write_new_folder(folder, write)
    print(f"wrote {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return folder


def write_rows(path: Path, seq_len: int, vocab: int = 32000) -> int:
    """Text rows from the demo task (the sentence and its fields as plain words, no JSON braces,
    whose SmolLM2 token lies above 32000) that tokenise to more than seq_len ids, every id under
    `vocab`: truncated to seq_len, every batch is [4, seq_len]. Returns the number of rows."""
    from transformers import AutoTokenizer

    from qforge.model.load import smollm2_folder
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder()))
    rows = []
    for line in (ROOT / "qforge" / "data" / "demo_task" / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        fields = json.loads(messages[2]["content"])
        text = (f"{messages[1]['content']} So the name is {fields['name']}, the age is {fields['age']}, the city "
                f"is {fields['city']} and the job is {fields['job']}.")
        ids = tok(text)["input_ids"]
        if len(ids) > seq_len and max(ids) < vocab:
            rows.append({"text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


# ---- one rank (under torchrun) --------------------------------------------------------------------
def local_bytes(t) -> int:
    """Bytes this rank holds of `t` (its local shard for a DTensor)."""
    if t is None:
        return 0
    to_local = getattr(t, "to_local", None)
    t = to_local() if to_local is not None else t
    return t.numel() * t.element_size()


def held_here(model, optimizer) -> dict[str, int]:
    """held_bytes' components counted here, the same way (for a checkout without it, or a model it
    cannot read): base = the 4-bit codes and absmax (qforge.dist.local_quantised_bytes), adapters =
    the trainable parameters, gradients = as many bytes (FSDP's shard of each), optimizer = the
    optimiser's state tensors, embeddings = every other parameter; each as this rank's part."""
    import torch

    from qforge.dist import local_quantised_bytes
    from qforge.dist.shard import quantised_layers
    held = dict.fromkeys(COMPONENTS, 0)
    held["base"] = local_quantised_bytes(model)[0]
    storage = {id(getattr(layer, name)) for layer in quantised_layers(model)
               for name in ("weight", "weight_absmax") if isinstance(getattr(layer, name, None), torch.Tensor)}
    for p in {id(p): p for p in model.parameters()}.values():  # a tied weight once
        if id(p) not in storage:
            held["adapters" if p.requires_grad else "embeddings"] += local_bytes(p)
    held["gradients"] = held["adapters"]
    held["optimizer"] = sum(local_bytes(t) for state in optimizer.state.values() for t in state.values()
                            if isinstance(t, torch.Tensor))
    return held


def held_components(model, optimizer) -> tuple[dict[str, int], str]:
    """(bytes by component, where the figures come from)."""
    try:
        from qforge.dist.shard import held_bytes
    except ImportError:
        return held_here(model, optimizer), "computed in scale.py (qforge.dist.shard.held_bytes absent)"
    try:
        return dict(held_bytes(model, optimizer)), "qforge.dist.shard.held_bytes"
    except AttributeError as exc:  # seen on an unsharded model (N=1): said in the output, counted here
        return held_here(model, optimizer), f"computed in scale.py (held_bytes failed: {exc})"


class Meter:
    """This process's memory above a baseline taken at creation: host memory (VmRSS / VmHWM, the
    peak restarted by writing '5' to /proc/self/clear_refs) or, on a GPU, what torch allocated there
    (max_memory_allocated, reset_peak_memory_stats; the baseline is then 0)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.baseline = 0 if cuda else status_bytes("VmRSS")
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.cuda:
            import torch
            return torch.cuda.max_memory_allocated()
        return status_bytes("VmHWM") - self.baseline

    def now(self) -> int:
        if self.cuda:
            import torch
            return torch.cuda.memory_allocated()
        return status_bytes("VmRSS") - self.baseline


def worker(args) -> None:
    import torch
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import qforge.adapters  # noqa: F401
    import qforge.model.load  # noqa: F401
    import qforge.optim  # noqa: F401
    from qforge.dist import close_group, init_group
    from qforge.kernels import dispatch
    from qforge.model.load import release_free_memory
    from qforge.train import loop
    from qforge.train.config import TrainConfig
    from qforge.train.run import prepare

    cuda = args.device == "cuda"
    dispatch.warm_up(torch.device(args.device))  # the native CPU library before the baseline (nothing on cuda)
    group = init_group(device_kind=args.device)  # gloo on the CPU, NCCL with one GPU a rank
    import gc
    gc.collect()
    release_free_memory()
    meter = Meter(cuda)
    cfg = TrainConfig(model=args.model, data=args.data, data_format="text", train_on="all", method="qlora",
                      rank=RANK, alpha=2 * RANK, dropout=0.0, compute_dtype="float32", optimizer="paged_adamw_8bit",
                      lr=1e-3, warmup_ratio=0.0, max_steps=args.steps, batch_size=BATCH, max_seq_len=args.seq_len,
                      gradient_checkpointing=True, keep_base_outputs=False, save_every=0, seed=0,
                      output_dir=args.out, device=args.device)
    box: dict = {}
    make_optimizer = loop.make_optimizer

    def make_and_watch(params, cfg, log=None):
        """The run's optimiser, its step wrapped: held bytes are read just before the last step."""
        optimizer = make_optimizer(params, cfg, log)
        step = optimizer.step

        def watched_step(*a, **k):
            if box.get("steps_done", 0) == args.steps - 1:
                box["held"], box["held_source"] = held_components(run.model, optimizer)
            return step(*a, **k)
        optimizer.step = watched_step
        return optimizer

    loop.make_optimizer = make_and_watch
    run = prepare(cfg, group=group, log=lambda *_: None)
    gc.collect()
    release_free_memory()
    load_peak, loaded = meter.peak(), meter.now()

    def on_step(record: dict) -> None:
        box["steps_done"] = record["step"]
        if record["step"] == 1:
            meter.reset()  # the peak of steps 2..: the optimiser's state exists from step 1 on

    run.train(on_step=on_step)
    report = {"rank": group.rank, "world": group.world, "device": args.device, "baseline": meter.baseline,
              "load_peak": load_peak, "loaded": loaded, "peak": meter.peak(), "held": box["held"], "held_source": box["held_source"],
              "sharding": run.sharding, "losses": run.result.losses}
    Path(args.out, f"rank-{group.rank}.json").write_text(json.dumps(report, indent=2))
    group.barrier()
    close_group(group)


# ---- the launcher ---------------------------------------------------------------------------------
def run_in_group(cmd: list[str], timeout_s: float, **popen_kw) -> int:
    """Run `cmd` in a process group of its own and return its exit status; past `timeout_s` kill the
    whole group (torchrun and every rank it started: subprocess.run's timeout kills the direct child
    alone and leaves the ranks holding their memory) and raise subprocess.TimeoutExpired."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def launch(model: str, nproc: int, data: Path, out: Path, args) -> list[dict]:
    """One torchrun launch of `nproc` ranks; every rank's report, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MEASURE_ENV, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", QFORGE_DIST_TIMEOUT=os.environ.get("QFORGE_DIST_TIMEOUT", "900"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--model", model, "--data", str(data), "--out", str(out),
           "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--device", args.device]
    t0 = time.perf_counter()
    with open(out / "torchrun.log", "w") as log:
        try:
            rc = run_in_group(cmd, args.timeout_s, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{model} at N={nproc}: no result within --timeout-s {args.timeout_s:g} s; torchrun "
                               f"and its ranks were killed (log: {out / 'torchrun.log'})") from None
    if rc != 0:
        tail = (out / "torchrun.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{model} at N={nproc}: torchrun exit status {rc}:\n{tail}")
    print(f"  N={nproc}: {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]


def planner_figures(folder: str, nproc: int, seq_len: int, device: str = "cpu") -> dict | None:
    """qforge.plan.per_rank(...) for one rank of this run (bytes by component and "total"); None
    while the checkout has no per_rank. The run computes in float32: the device's constants with
    4-byte activations, and the embeddings kept in float32 (residual_bytes 4)."""
    import dataclasses
    try:
        from qforge.plan import per_rank
    except ImportError:
        return None
    from qforge.plan.arch import load_arch
    from qforge.plan.policy import constants_for
    constants = dataclasses.replace(constants_for(device), compute_bytes=4)
    return per_rank(load_arch(folder), method="qlora", world=nproc, seq_len=seq_len, batch_size=BATCH, rank=RANK,
                    gradient_checkpointing=True, constants=constants, optimizer="paged_adamw_8bit", adapter_bytes=4,
                    chunked_loss=True, keep_base_outputs=False, residual_bytes=4)


def mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def model_table(name: str, runs: dict[int, list[dict]], planned: dict[int, dict | None]) -> tuple[str, list[float]]:
    """The markdown table of one model (a row per N and rank, then the planner's row per N) and the
    planner's errors on the total."""
    header = ["N", "rank", *COMPONENTS, "activations", "peak", "load peak", "planner", "planner err"]
    rows, errors = [], []
    for n, reports in runs.items():
        for r in reports:
            held = r["held"]
            acts = r["peak"] - sum(held.get(k, 0) for k in HELD_KEYS)
            plan = planned[n]["total"] if planned.get(n) else None
            err = None if plan is None else (plan - r["peak"]) / r["peak"]
            if err is not None:
                errors.append(err)
            rows.append([n, r["rank"], *(mib(held[k]) for k in COMPONENTS), mib(acts), mib(r["peak"]),
                         mib(r["load_peak"]), "-" if plan is None else mib(plan),
                         "-" if err is None else f"{100 * err:+.1f}%"])
        if planned.get(n):  # the planner's components beside the measured ones
            p = planned[n]
            rows.append([n, "plan", *(mib(p.get(k, 0)) for k in COMPONENTS),
                         mib(p.get("activations", 0) + p.get("buffers", 0)), mib(p["total"]), "", "", ""])
    return f"{name} (MiB per rank)\n\n" + markdown_table(header, rows), errors


def scaling_lines(runs: dict[int, list[dict]]) -> list[str]:
    """Each component's largest rank figure at N, times N, over N=1's: 1.00 when it falls as 1/N."""
    one = runs.get(1)
    if not one:
        return []
    lines = []
    for n, reports in runs.items():
        if n == 1:
            continue
        parts = []
        for k in SHARDED:
            whole = one[0]["held"][k]
            worst = max(r["held"][k] for r in reports)
            parts.append(f"{k} {n * worst / whole:.3f}" if whole else f"{k} -")
        lines.append(f"  N={n}: largest rank's share x N: " + ", ".join(parts))
    return lines


def loss_lines(runs: dict[int, list[dict]]) -> tuple[list[str], list[float]]:
    """Each N's loss curve against N=1's: (lines, the max relative differences)."""
    ref = runs[1][0]["losses"]
    out, diffs = [f"  N=1: losses {', '.join(f'{x:.6f}' for x in ref)}"], []
    for n, reports in runs.items():
        if n == 1:
            continue
        mine = reports[0]["losses"]
        diffs.append(max(abs(a - b) / abs(a) for a, b in zip(ref, mine)))
        out.append(f"  N={n}: loss curve vs N=1: max relative difference {diffs[-1]:.2e} over {len(mine)} steps")
    return out, diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tinyllama",
                        help="comma-separated, from: smollm2 (embedded SmolLM2-135M), tinyllama (random 1.1B shape)")
    parser.add_argument("--nprocs", default="1,2,4", help="comma-separated process counts; 1 is the reference")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per run (the peak is over steps 2..)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per row (every row truncated to it)")
    parser.add_argument("--cache", default=None, help="where the TinyLlama-shaped checkpoint is kept "
                        "(default $QFORGE_CACHE/bench)")
    parser.add_argument("--work", default=None, help="output folder of the runs (default: a temporary one, removed)")
    parser.add_argument("--timeout-s", type=float, default=1200, help="limit for one torchrun launch")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: gloo, host memory (the default); cuda: NCCL, one GPU a rank, GPU memory "
                             "(torch.cuda.max_memory_allocated), as benchmarks/gpu_check.sh runs it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    nprocs = sorted({int(n) for n in args.nprocs.split(",")})
    bad = [m for m in models if m not in ("smollm2", "tinyllama")]
    if bad or not models:
        parser.error(f"--models: expected smollm2 and/or tinyllama, got {args.models!r}")
    if args.steps < 2:
        parser.error(f"--steps: at least 2 (the peak is taken over steps 2..), got {args.steps}")
    if 1 not in nprocs or any(BATCH % n for n in nprocs):
        parser.error(f"--nprocs: must include 1 and divide the batch of {BATCH}, got {args.nprocs!r}")
    import tempfile

    from qforge.model.load import smollm2_folder
    from qforge.paths import cache_dir
    cache = Path(args.cache) if args.cache else cache_dir("bench")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qforge-scale-"))
    data = work / "rows.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    print(f"{write_rows(data, args.seq_len)} text rows of > {args.seq_len} tokens; batch {BATCH}, "
          f"{args.steps} steps, N = {', '.join(map(str, nprocs))}", flush=True)
    folders = {"smollm2": str(smollm2_folder()), "tinyllama": None}
    headline_model = "tinyllama" if "tinyllama" in models else models[0]
    all_errors, all_diffs, ratio = [], [], math.nan
    try:
        for name in models:
            folder = folders[name] or str(tinyllama_folder(cache))
            print(f"\n{name}: {folder}", flush=True)
            runs = {n: launch(folder, n, data, work / f"{name}-n{n}", args) for n in nprocs}
            planned = {n: planner_figures(folder, n, args.seq_len, args.device) for n in nprocs}
            table, errors = model_table(name, runs, planned)
            all_errors += errors
            print(f"\n{table}\n")
            for source in sorted({f"N={n}: {r['held_source']}" for n, rs in runs.items() for r in rs[:1]}):
                print(f"held figures from {source}")
            lines, diffs = loss_lines(runs)
            all_diffs += diffs
            print("\n".join(scaling_lines(runs) + lines))
            if planned[1] is None:
                print("  planner: qforge.plan.per_rank not in this checkout; no comparison")
            if name == headline_model:
                ratio = runs[max(nprocs)][0]["peak"] / runs[1][0]["peak"]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    err_max = max((abs(e) for e in all_errors), default=math.nan)
    print(f"loss_rel_diff_max={max(all_diffs, default=math.nan):.3g}")
    print(f"per_rank_peak_{max(nprocs)}_vs_1={ratio:.3f} planner_err_max={err_max:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
