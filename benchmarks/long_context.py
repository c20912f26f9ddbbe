"""Long rows on the CPU: qforge QLoRA beside PEFT over bitsandbytes at 1k, 2k, 4k, 8k and 16k tokens per row.

    python benchmarks/long_context.py [--lengths 1024,2048,4096,8192,16384] [--steps 3] [--sides qforge,peft]
        [--model smollm2] [--limit-gib 20] [--work DIR]

The model (--model): smollm2 (default), the embedded SmolLM2-135M-Instruct; or random13m, the old
randomly initialised 13M Llama shape (hidden 128, intermediate 384, 2 layers, 4 heads of 32 / 2 KV
heads, SmolLM2's 49,152-token vocabulary, untied head; SHAPE below), written once under
$QFORGE_CACHE/bench. Either is quantised once by `qforge quantize` into a bitsandbytes-format folder
(NF4, double quantisation, blocks of 64, bf16 compute) that BOTH sides load, so they train on the
same 4-bit weights and their first losses agree.

The rows: the demo task's training rows through the chat template, one after another, cut to the
row length (random ids for random13m); batch 1; every token a target; step s takes the s-th row.
Every (side, length) runs in a fresh process, with glibc's mmap threshold fixed at 128 KiB
(MEASURE_ENV, as benchmarks/plan_calibration.py) and OMP_WAIT_POLICY=PASSIVE, --steps optimiser
steps (default 3):
  qforge  as `qforge train` runs by default: QLoRA r=16 / alpha 32 on every linear, dropout 0.05, its
          default checkpointing (keep_base_outputs auto: the plan decides from the memory free when
          the run starts, so the table says what it chose) and attention (SDPA at
          these lengths), the default residual dtype (float32 for qlora), bf16 autocast, the
          trainer's loss (qforge.train.loss.causal_lm_loss: chunked at these lengths), paged 8-bit AdamW.
  peft    PEFT's documented QLoRA recipe (benchmarks/train_step.py's peft-recipe): transformers
          loading the same folder over bitsandbytes, prepare_model_for_kbit_training (float32 upcast
          of every non-4-bit weight, full non-reentrant gradient checkpointing), transformers' SDPA
          attention, LoraConfig r=16 alpha 32 dropout 0.05 all-linear, bitsandbytes' AdamW8bit, bf16
          autocast, `model(**batch).loss`.
Both sides clip the gradient norm at 1.0 (as qforge's trainer and transformers' Trainer do).

Measured, per process: step 1 runs untimed; then gc, malloc_trim and a reset of the kernel's
peak-RSS mark (writing 5 to /proc/self/clear_refs), so the peak is that of steps 2..N (loading and
the first step's one-off allocations do not count). Peak RSS: VmHWM at the end (absolute: nothing
subtracted, the import baseline included on both sides). Peak anon: the largest RssAnon a thread
read every 10 ms over steps 2..N (anonymous memory: transformers keeps the 4-bit weights as views of
its mmap of the safetensors file, counted in RSS but not in RssAnon; qforge reads with pread, so its
weights are anonymous). tokens/s: the tokens of steps 2..N over their wall time. The planner column
is qforge.plan's total (CPU constants, the same settings and keep_base_outputs as the run) beside
qforge's peak RSS above its import baseline (what the planner sizes), and the relative error.

A watchdog thread in the parent reads each child's VmRSS every 0.2 s: a child above --limit-gib
(default 20 GiB, for a 24 GiB machine) is killed and the (side, length) is recorded as "did not fit"
with the last RSS it read; a child that fails is recorded with its error; the script goes on.
Records: --work DIR/<model>/<side>-<length>.result.json, each with its commit, date and load
average (the run's table says the commits); --resume reuses them (a long run made in parts).

Last line: `qforge_growth_16k_vs_1k=X peft_growth_16k_vs_1k=Y qforge_mem_16k_vs_peft=Z`: X and Y each
side's peak RSS at 16k over its peak RSS at 1k, Z qforge's 16k peak RSS over PEFT's (nan where a side
did not fit or was not run, with a note on the line before).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import proc_status, quantize_once, status_bytes  # noqa: E402

SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152, max_position_embeddings=32768, tie_word_embeddings=False,
             rms_norm_eps=1e-5, rope_theta=10000.0)
NAME = "llama-13m-long-context-random"  # the random13m model's folder under $QFORGE_CACHE/bench
MODELS = ("smollm2", "random13m")
SIDES = ("qforge", "peft")
RANK = 16
LR = 1e-4
LENGTHS = (1024, 2048, 4096, 8192, 16384)


# ---- the models and rows (the parent, once) ---------------------------------------------------------
def write_model(folder: Path) -> None:
    """The random 13M model (bf16 safetensors) with SmolLM2's tokenizer, atomically."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qforge.model.checkpoint import write_new_folder
    from qforge.model.load import smollm2_folder

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_folder() / name, tmp / name)

    write_new_folder(folder, write)


def model_folders(model: str, cache: Path) -> dict[str, str]:
    """{"dense": bf16 folder, "bnb": its bitsandbytes-format 4-bit folder}, each written once."""
    from qforge.model.load import smollm2_folder

    if model == "smollm2":
        dense = smollm2_folder()
    else:
        dense = cache / NAME
        if not (dense / "config.json").is_file():
            write_model(dense)
    bnb = cache / f"{model}-nf4-dq-b64-bf16"
    quantize_once(dense, bnb)
    return {"dense": str(dense), "bnb": str(bnb)}


def stream_rows(stream: list[int], seq_len: int, count: int) -> list[list[int]]:
    """`count` rows of `seq_len` ids taken one after another from `stream`, cycling through it
    (row s starts where row s-1 ended)."""
    if not stream:
        raise ValueError("stream: expected at least one token id, got none")
    start, rows = 0, []
    for _ in range(count):
        row = [stream[(start + i) % len(stream)] for i in range(seq_len)]
        rows.append(row)
        start = (start + seq_len) % len(stream)
    return rows


def write_rows(model: str, seq_len: int, steps: int, work: Path) -> Path:
    """The rows of every step at one length, saved once (both sides read the same tensors):
    a list of {"input_ids", "labels", "attention_mask"}, each (1, seq_len) int64, labels = input_ids."""
    import io

    import torch

    from qforge.fileio import atomic_write_bytes

    path = work / f"rows-{seq_len}-s{steps}.pt"
    if path.is_file():
        return path
    if model == "random13m":
        gen = torch.Generator().manual_seed(0)
        stream = torch.randint(0, SHAPE["vocab_size"], (seq_len * steps,), generator=gen).tolist()
    else:
        from transformers import AutoTokenizer

        from qforge.eval.tasks import demo_task_paths
        from qforge.model.load import smollm2_folder
        from qforge.train.data import build_dataset
        tok = AutoTokenizer.from_pretrained(smollm2_folder())
        train, _, _ = build_dataset(demo_task_paths()["train"], tok, max_seq_len=256)
        stream = [t for ex in train for t in ex["input_ids"]]
    batches = []
    for row in stream_rows(stream, seq_len, steps):
        ids = torch.tensor([row], dtype=torch.long)
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    buf = io.BytesIO()
    torch.save(batches, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---- one (side, length), in a fresh process ---------------------------------------------------------
def qforge_config(folder: str, seq_len: int):
    """The TrainConfig of `qforge train`'s defaults for this run (r=16 / alpha 32 given)."""
    from qforge.train.config import TrainConfig
    return TrainConfig(model=folder, method="qlora", rank=RANK, alpha=2 * RANK, dropout=0.05, lr=LR, batch_size=1,
                       max_seq_len=seq_len, device="cpu", output_dir="/dev/null")


def build_side(side: str, folders: dict, seq_len: int, first_batch: dict):
    """(model, optimizer, loss_fn, autocast context factory, the planner's total or None)."""
    import torch

    if side == "peft":
        from train_step import build_peft
        model, opt = build_peft("peft-recipe", folders["bnb"], first_batch)

        def loss_fn(batch):
            return model(**batch, use_cache=False).loss
        return model, opt, loss_fn, (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
    from qforge.train.loop import autocast, make_optimizer
    from qforge.train.loss import causal_lm_loss
    from qforge.train.run import load_for_method
    cfg = qforge_config(folders["bnb"], seq_len)
    model, _ = load_for_method(cfg, torch.device("cpu"))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    return model, opt, (lambda batch: causal_lm_loss(model, batch)), (lambda: autocast(cfg, torch.device("cpu"))), cfg


def qforge_attention(name: str | None, heads: int, seq_len: int, residual_dtype: str) -> str | None:
    """Which path qforge's attention (qforge.nn.attention) takes for these rows on the CPU: SDPA for
    float32 queries (a float32 residual) or above MATH_MAX_SCORES scores, else its matrix path."""
    from qforge.nn.attention import MATH_MAX_SCORES
    if not name or not name.startswith("qforge"):
        return name
    sdpa = residual_dtype == "float32" or heads * seq_len * seq_len > MATH_MAX_SCORES
    return "qforge: sdpa" if sdpa else "qforge: matrix (eager products)"


def planned_total(cfg, dense_folder: str, keep: bool) -> int:
    """qforge.plan's total (CPU constants) for the run's settings, with the keep_base_outputs it ran."""
    from qforge.plan import plan_for_config
    config = json.loads((Path(dense_folder) / "config.json").read_text())
    return plan_for_config(cfg, config, "cpu", keep_base_outputs=keep).total


def import_side(side: str) -> None:
    """What a side imports or builds once, before its baseline (as plan_calibration's
    measure_training_peak does for qforge), so the baseline holds the code and not the run."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401

    from qforge.model.load import release_free_memory
    if side == "peft":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    else:
        import qforge.adapters  # noqa: F401
        import qforge.optim  # noqa: F401
        import qforge.train.loss  # noqa: F401
        import qforge.train.run  # noqa: F401
        from qforge.kernels import dispatch
        dispatch.warm_up(torch.device("cpu"))  # the native kernel library, built or loaded
    release_free_memory()


def measure(side: str, folders: dict, rows_path: str, out: Path) -> None:
    """Train one (side, length) for len(rows) steps in this process; the record (see the module
    docstring) is rewritten atomically after every step, so a killed run leaves its last figures."""
    import torch
    import transformers  # noqa: F401  (both sides import it: in the baseline alike)

    from qforge.fileio import atomic_write_bytes
    from qforge.model.load import release_free_memory
    from load_memory import AnonSampler
    from train_step import checkpoint_policy, malloc_trim, reset_peak

    import_side(side)
    torch.manual_seed(0)
    baseline = status_bytes("VmRSS")
    batches = torch.load(rows_path, weights_only=True)
    seq_len = int(batches[0]["input_ids"].shape[1])
    model, opt, loss_fn, amp, cfg = build_side(side, folders, seq_len, batches[0])
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    release_free_memory()
    rec = {"side": side, "seq_len": seq_len, "steps": len(batches), "baseline_rss": baseline,
           "loaded_rss": status_bytes("VmRSS"), "checkpointing": checkpoint_policy(model),
           "attention": getattr(model.config, "_attn_implementation", None), "threads": torch.get_num_threads(),
           "losses": [], "step_s": [], "done": False}
    sampler = AnonSampler(every=0.01)
    for i, batch in enumerate(batches):
        if i == 1:  # steps 2..N are measured: the first step's one-off allocations are freed first
            gc.collect()
            malloc_trim()
            rec["reset_ok"] = reset_peak()
            sampler.start()
        t = time.perf_counter()
        with amp():
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec["step_s"].append(time.perf_counter() - t)
        rec["losses"].append(round(loss.item(), 4))
        del loss
        now = proc_status("VmHWM", "VmRSS", "RssAnon", "RssFile")
        rec.update(last_rss=now["VmRSS"], peak_rss=now["VmHWM"] if i >= 1 else None,
                   peak_anon=max(sampler.peak, now["RssAnon"]) if i >= 1 else None, rss_file=now["RssFile"])
        atomic_write_bytes(out, json.dumps(rec).encode())
    sampler.stop()
    rec["peak_anon"] = sampler.peak
    rec["tokens_per_s"] = seq_len * (len(batches) - 1) / sum(rec["step_s"][1:])
    if cfg is not None:
        keep = rec["checkpointing"].startswith("selective")
        rec["planned"] = planned_total(cfg, folders["dense"], keep)
        rec["residual_dtype"] = cfg.residual_dtype
        rec["attention"] = qforge_attention(rec["attention"], model.config.num_attention_heads, seq_len,
                                            cfg.residual_dtype)
    rec["done"] = True
    atomic_write_bytes(out, json.dumps(rec).encode())


# ---- the parent: fresh processes under a watchdog ---------------------------------------------------
def run_child(side: str, folders: dict, rows: Path, out: Path, limit_bytes: int) -> dict:
    """Run one (side, length) in a fresh process, killed above limit_bytes of RSS; its record, with
    status "ok", "did not fit" (killed by the watchdog) or "failed" (and the error's last lines)."""
    from plan_calibration import MEASURE_ENV

    out.unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **MEASURE_ENV)
    err = out.with_suffix(".log")
    with open(err, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", side, json.dumps(folders), str(rows), str(out)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        watch = {"max_rss": 0, "killed": False}
        done = threading.Event()
        thread = threading.Thread(target=watchdog, args=(proc, limit_bytes, watch, done), daemon=True)
        thread.start()
        code = proc.wait()
        done.set()
        thread.join()
    rec = json.loads(out.read_text()) if out.is_file() else {"side": side, "losses": [], "step_s": []}
    rec["watchdog_max_rss"] = watch["max_rss"]
    if watch["killed"]:
        rec["status"] = "did not fit"
    elif code or not rec.get("done"):
        rec["status"] = "failed"
        rec["error"] = err.read_text(errors="replace")[-1500:]
    else:
        rec["status"] = "ok"
    return rec


def child_rss(pid: int) -> int:
    """VmRSS of process `pid` in bytes (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def watchdog(proc, limit_bytes: int, watch: dict, done: threading.Event, every: float = 0.2) -> None:
    """Poll the child's RSS; kill it (and note so) the first time it is above limit_bytes."""
    while not done.is_set() and proc.poll() is None:
        rss = child_rss(proc.pid)
        watch["max_rss"] = max(watch["max_rss"], rss)
        if over_limit(rss, limit_bytes):
            watch["killed"] = True
            proc.kill()
            return
        done.wait(every)


def over_limit(rss: int, limit_bytes: int) -> bool:
    return rss > limit_bytes


# ---- the report ------------------------------------------------------------------------------------
def gb(x) -> str:
    return f"{x / 1e9:.2f}" if x else "-"


def side_cells(rec: dict | None) -> list[str]:
    """peak RSS, peak anon (GB), tokens/s, step s, first loss; or what happened instead."""
    if rec is None:
        return ["not run"] + ["-"] * 4
    first = f"{rec['losses'][0]:.3f}" if rec.get("losses") else "-"
    if rec.get("status") != "ok":
        last = rec.get("watchdog_max_rss") or rec.get("last_rss")
        return [f"{rec.get('status', 'failed')} (last {gb(last)} GB)", "-", "-", "-", first]
    steps = rec["step_s"][1:]
    return [gb(rec["peak_rss"]), gb(rec["peak_anon"]), f"{rec['tokens_per_s']:.0f}",
            f"{sum(steps) / len(steps):.1f}", first]


HEADER = ("| tokens per row | qforge peak RSS (GB) | qforge peak anon (GB) | qforge tokens/s | qforge step (s) "
          "| qforge first loss | PEFT peak RSS (GB) | PEFT peak anon (GB) | PEFT tokens/s | PEFT step (s) "
          "| PEFT first loss | qforge / PEFT peak RSS | planner (qforge, GB) | planner error | qforge checkpointing |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def table_row(seq_len: int, q: dict | None, p: dict | None) -> str:
    """One length's line: both sides' cells, the peak ratio, and the planner beside qforge's peak
    above its import baseline."""
    ratio = ok_peak(q) / ok_peak(p) if ok_peak(q) and ok_peak(p) else None
    plan, err = "-", "-"
    if q is not None and q.get("planned") and ok_peak(q):
        plan = gb(q["planned"])
        err = f"{q['planned'] / (q['peak_rss'] - q['baseline_rss']) - 1:+.1%}"
    # keep_base_outputs auto: the plan chooses from the memory free when the run starts, so say what it chose
    ckpt = (q or {}).get("checkpointing") or "-"
    cells = [str(seq_len)] + side_cells(q) + side_cells(p) + [f"{ratio:.2f}" if ratio else "-", plan, err, ckpt]
    return "| " + " | ".join(cells) + " |"


def ok_peak(rec: dict | None) -> int | None:
    """The record's peak RSS when it ran to the end, else None."""
    return rec["peak_rss"] if rec and rec.get("status") == "ok" and rec.get("peak_rss") else None


def final_line(results: dict) -> tuple[str, list[str]]:
    """(last line, notes): results {side: {seq_len: record}}; growth = peak RSS at 16k / at 1k per
    side, qforge_mem_16k_vs_peft = qforge's 16k peak RSS / PEFT's; nan (and a note) where missing."""
    notes, values = [], {}

    def peak(side, n):
        rec = results.get(side, {}).get(n)
        if ok_peak(rec) is None:
            notes.append(f"{side} at {n}: {rec.get('status', 'failed') if rec else 'not run'}")
        return ok_peak(rec)

    for side in SIDES:
        a, b = peak(side, 1024), peak(side, 16384)
        values[side] = b / a if a and b else math.nan
    q, p = ok_peak(results.get("qforge", {}).get(16384)), ok_peak(results.get("peft", {}).get(16384))
    z = q / p if q and p else math.nan
    line = (f"qforge_growth_16k_vs_1k={values['qforge']:.2f} peft_growth_16k_vs_1k={values['peft']:.2f} "
            f"qforge_mem_16k_vs_peft={z:.2f}")
    return line, sorted(set(notes))


def reusable(path: Path, steps: int) -> dict | None:
    """The result recorded at `path` by an earlier run with the same --steps, else None."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("steps") == steps else None


def parse_list(text: str, allowed: tuple | None = None, name: str = "") -> list:
    """Comma-separated values: integers when `allowed` is None, else each one of `allowed`; a clear
    SystemExit naming the option `name` otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is None:
        try:
            return [int(x) for x in items]
        except ValueError:
            raise SystemExit(f"{name}: expected comma-separated integers, got {text!r}") from None
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"{name}: expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help="tokens per row, comma-separated (default 1024,...,16384)")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per length, >= 2 (default 3: "
                                                             "step 1 untimed, the peak and speed over steps 2..3)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of qforge, peft (default both)")
    parser.add_argument("--model", default="smollm2", choices=MODELS,
                        help="smollm2: the embedded SmolLM2-135M-Instruct (default); random13m: the old 13M random shape")
    parser.add_argument("--limit-gib", type=float, default=20.0,
                        help="a child above this RSS (GiB) is killed and recorded as 'did not fit' (default 20)")
    parser.add_argument("--work", default=None, help="records and rows (default $QFORGE_CACHE/bench/long_context_run)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the results already in --work for the same model, side, length and --steps "
                             "(a long run made in parts); without it every (side, length) runs again")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, folders, rows, out = args.child
        measure(side, json.loads(folders), rows, Path(out))
        return
    lengths = parse_list(args.lengths, name="--lengths")
    sides = parse_list(args.sides, SIDES, "--sides")
    if args.steps < 2:
        raise SystemExit(f"--steps: expected >= 2 (step 1 is not measured), got {args.steps}")
    if not lengths or min(lengths) < 2:
        raise SystemExit(f"--lengths: expected integers >= 2, got {args.lengths!r}")
    if args.limit_gib <= 0:
        raise SystemExit(f"--limit-gib: expected > 0, got {args.limit_gib:g}")
    from qforge.fileio import atomic_write_bytes
    from qforge.paths import cache_dir
    from train_step import git_commit

    cache = cache_dir("bench")
    work = Path(args.work) if args.work else cache / "long_context_run"
    work = work / args.model
    work.mkdir(parents=True, exist_ok=True)
    folders = model_folders(args.model, cache)
    print(f"model {args.model} ({folders['bnb']}), {args.steps} steps per length, batch 1, every token a target, "
          f"limit {args.limit_gib:g} GiB RSS; load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {side: {} for side in sides}
    for seq_len in lengths:
        rows = write_rows(args.model, seq_len, args.steps, work)
        for side in sides:
            t, done = time.perf_counter(), work / f"{side}-{seq_len}.result.json"
            rec = reusable(done, args.steps) if args.resume else None
            if rec is None:
                rec = run_child(side, folders, rows, work / f"{side}-{seq_len}.json", int(args.limit_gib * 2**30))
                rec.update(steps=args.steps, commit=git_commit(), loadavg=os.getloadavg()[0],
                           date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
                atomic_write_bytes(done, json.dumps(rec).encode())
            results[side][seq_len] = rec
            print(f"{side} {seq_len}: {rec['status']}, {time.perf_counter() - t:.0f} s wall, commit {rec['commit']}, losses {rec['losses']}, "
                  f"checkpointing {rec.get('checkpointing')}, attention {rec.get('attention')}"
                  + (f", residual {rec['residual_dtype']}" if rec.get("residual_dtype") else "")
                  + (f"\n{rec['error']}" if rec["status"] == "failed" else ""), flush=True)
    print("\n" + HEADER)
    for seq_len in lengths:
        print(table_row(seq_len, results.get("qforge", {}).get(seq_len), results.get("peft", {}).get(seq_len)))
    line, notes = final_line(results)
    commits = sorted({r.get("commit", "?") for by_len in results.values() for r in by_len.values()})
    print(f"\ncommit {', '.join(commits)}; load average now {os.getloadavg()[0]:.2f}"
          + (f"; nan: {'; '.join(notes)}" if notes else ""))
    print(line)


if __name__ == "__main__":
    main()
